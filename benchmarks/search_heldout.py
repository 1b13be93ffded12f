"""Check a search's recipes on images it did not score: top-1 agreement with the unmerged model,
KL of the logits and top-1 accuracy of each recipe, training-free, on every image of the
folder's evaluation split outside the search's seeded calibration subset.

    python benchmarks/search_heldout.py runs/cifar10/vim_cifar10.pth --data /tmp/cifar10 \\
        --recipes benchmarks/cifar10/merge-r031.toml,runs/search/found.toml --search-images 1024 --out heldout.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor import load_model  # noqa: E402
from compressor.recipes import load_recipe  # noqa: E402
from compressor.search import QualityScorer, Space, load_calibration  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--data", required=True)
    p.add_argument("--recipes", required=True, help="comma-separated names or .toml paths")
    p.add_argument("--search-images", type=int, default=512, help="--num-images of the search")
    p.add_argument("--search-seed", type=int, default=0, help="--seed of the search")
    p.add_argument("--crop-pct", type=float, default=1.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    model = load_model(args.ckpt).eval().to(args.device)
    cfg = model.cfg
    calib = load_calibration(args.data, args.search_images, cfg.img_size, args.crop_pct, cfg.num_classes,
                             seed=args.search_seed, held_out=True)
    space = Space(cfg.num_tokens, cfg.cls_index, cfg.depth)
    scorer = QualityScorer(model, space, calib, device=args.device, batch_size=256)
    rows = [{"recipe": "none", "schedule": "none", "tokens_last": cfg.num_tokens, **scorer(space.plain())}]
    for name in args.recipes.split(","):
        r = load_recipe(name)
        s = space.from_config(r.merge)
        rows.append({"recipe": r.name, "schedule": space.describe(s), "tokens_last": space.tokens(s)[-1],
                     "token_reduction": 1 - sum(space.tokens(s)) / (space.depth * space.num_tokens), **scorer(s)})
    print(f"{calib.source}; {args.device}, fp32")
    print(f"{'recipe':<24} {'agreement':>9} {'KL':>8} {'top-1':>7}  schedule")
    for r in rows:
        top1 = "-" if r["top1"] is None else f"{100 * r['top1']:.2f}"
        print(f"{r['recipe']:<24} {100 * r['agreement']:>8.2f}% {r['kl']:>8.4f} {top1:>7}  {r['schedule']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"images": calib.source, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
