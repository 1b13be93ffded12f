"""Launch parameters of the fast merge (compressor.merge.fast.TUNING), measured on the GPU.

For each candidate setting (one knob group changed from the default at a time): microseconds per
merge, timed as 20 back-to-back merges replayed from one CUDA graph (launch gaps as in a graphed
model), at Vim-S (197 tokens, D 384, r 11) and CIFAR (65 tokens, D 192, r 8) shapes, batch 1
and 128; then Vim-S r031 at batch 1 in a CUDA graph against the plain model, with the default
and with the best batch-1 setting.

    python benchmarks/tune_fast_merge.py --out tune.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor import convert, create_model  # noqa: E402
from compressor.inference import GraphedModel  # noqa: E402
from compressor.merge import fast  # noqa: E402
from compressor.models import set_backend  # noqa: E402

DEFAULT = dict(fast.TUNING)
CANDIDATES = {
    "default": {},
    "score 32x64": {"score_block_i": 32},
    "score 32x32": {"score_block_i": 32, "score_block_j": 32},
    "score d128 w8": {"score_block_d": 128, "score_warps": 8},
    "score w8": {"score_warps": 8},
    "slot w2": {"slot_warps": 2},
    "slot w8": {"slot_warps": 8},
    "gather w2": {"gather_warps": 2},
    "gather w8": {"gather_warps": 8},
}
SHAPES = {"vim_s": (197, 384, 11, 98, 93), "cifar": (65, 192, 8, 32, 28)}


def merge_us(batch: int, shape, reps: int = 20) -> float:
    L, d, r, ci, co = shape
    h = torch.randn(batch, L, d, device="cuda", dtype=torch.half)
    res = torch.randn(batch, L, d, device="cuda")
    size = torch.rand(batch, L, 1, device="cuda") + 0.5
    for _ in range(2):
        fast.fast_merge(h, res, size, r, ci, co)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fast.fast_merge(h, res, size, r, ci, co)
    times = []
    for _ in range(7):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / reps)
    g.reset()
    return sorted(times)[len(times) // 2]


def model_ms(model, x, reps: int = 50) -> float:
    graphed = GraphedModel(model, clone_output=False)
    run = graphed.replayer(x)
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        s.record()
        run()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    graphed.reset()
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = {}
    for name, change in CANDIDATES.items():
        fast.TUNING.clear()
        fast.TUNING.update(DEFAULT | change)
        rows[name] = {f"{s}_b{b}": merge_us(b, shape) for s, shape in SHAPES.items() for b in (1, 128)}
        print(f"{name:16s} " + "  ".join(f"{k} {v:7.1f} us" for k, v in rows[name].items()), flush=True)
    base128 = rows["default"]

    def ok(n):  # no worse than the default at batch 128 (within 3%)
        return all(rows[n][k] <= 1.03 * base128[k] for k in base128 if k.endswith("b128"))

    best = min((n for n in rows if ok(n)), key=lambda n: rows[n]["vim_s_b1"] + rows[n]["cifar_b1"])
    print(f"best at batch 1 (no worse at 128): {best}")
    torch.manual_seed(0)
    plain = set_backend(convert(create_model("vim_small").eval(), "none"), "auto").cuda().half()
    merged = set_backend(convert(create_model("vim_small").eval(), "r031"), "auto").cuda().half()
    x = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.half)
    whole = {}
    for name in dict.fromkeys(["default", best]):
        fast.TUNING.clear()
        fast.TUNING.update(DEFAULT | CANDIDATES[name])
        with torch.inference_mode():
            t_plain, t_merged = model_ms(plain, x), model_ms(merged, x)
        whole[name] = {"plain_ms": t_plain, "r031_ms": t_merged, "speedup": t_plain / t_merged}
        print(f"vim_small batch 1 graph, {name}: plain {t_plain:.3f} ms, r031 {t_merged:.3f} ms, x{t_plain / t_merged:.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "default": DEFAULT,
                                           "candidates": CANDIDATES, "merge_us": rows, "best": best,
                                           "vim_small_b1_graph": whole}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
