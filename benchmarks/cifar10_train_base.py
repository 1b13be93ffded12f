"""Step 1 of the CIFAR-10 reproduction: train a Vision Mamba from scratch with rmeeto's engine.

The model is Vim-Ti wide (D 192) but 12 layers deep, on 32x32 images with 4x4 patches:
64 patches + a middle class token = 65 tokens. Training uses ``compressor.engine.fit`` with
the recipe ``benchmarks/cifar10/base.toml`` (no merges, no teacher), then the weights are written
in the official Vim checkpoint layout (``{'model': state_dict, 'args': Namespace}``) so that the
next steps use the file exactly as a user would use ``vim_s.pth``.

    python benchmarks/cifar10_train_base.py --data /tmp/cifar10 --out runs/cifar10 [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor._io import atomic_torch_save  # noqa: E402
from compressor.engine import fit  # noqa: E402
from compressor import load_model  # noqa: E402
from compressor.models import VimConfig, VisionMamba  # noqa: E402

CFG = VimConfig(embed_dim=192, depth=12, img_size=32, patch_size=4, stride=4, num_classes=10, drop_path_rate=0.1)
RECIPE = Path(__file__).resolve().parent / "cifar10" / "base.toml"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and test/ (or val/)")
    p.add_argument("--out", default="runs/cifar10")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    args = p.parse_args(argv)
    out = Path(args.out)
    torch.manual_seed(0)
    model = VisionMamba(CFG)
    t0 = time.perf_counter()
    result = fit(None, model, str(RECIPE), args.data, out / "base_run", epochs=args.epochs, device=args.device,
                 batch_size=args.batch_size)
    wall = time.perf_counter() - t0
    trained = load_model(out / "base_run" / "compressed.pt")  # recipe none: the plain model's weights
    ns = argparse.Namespace(model="vim_cifar_d192_depth12_p4_32px", nb_classes=10, input_size=32,
                            epochs=args.epochs, recipe=str(RECIPE.name))
    atomic_torch_save({"model": trained.state_dict(), "args": ns, "epoch": args.epochs}, out / "vim_cifar10.pth")
    summary = {"config": CFG.to_dict(), "wall_s": wall, "tokens": CFG.num_tokens,
               "best_top1": result.best_top1, "best_epoch": result.best_epoch, "final": result.final,
               "history": result.history}
    (out / "base_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"trained in {wall:.0f}s; wrote {out / 'vim_cifar10.pth'}")


if __name__ == "__main__":
    main()
