"""Where a converted model's GPU time goes, kernel by kernel (torch.profiler, CUDA activity).

Prints, per batch size, the total device time of the forward and the share of the merge kernels
(``score_kernel``, ``slot_kernel``, ``gather_kernel`` with the Triton merge; with ``--merge-impl
torch`` every kernel launched inside the merge modules is counted instead via record_function).

    python benchmarks/profile_merge_kernels.py --model vim_small --recipe r031 --batch-sizes 1,128
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor import convert, create_model, set_merge_impl  # noqa: E402
from compressor.models import set_backend  # noqa: E402

import kernel_profile  # noqa: E402  (benchmarks/, the script's folder)

MERGE_KERNELS = ("score_kernel", "slot_kernel", "gather_kernel")


def kernel_times(model, x, iters: int = 10) -> dict[str, list[float]]:
    """name -> [calls per forward, device microseconds per forward]."""
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        times = kernel_profile.kernel_times(lambda: model(x), iters)
    return {k: [calls, ms * 1e3] for k, (calls, ms) in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vim_small")
    p.add_argument("--recipe", default="r031")
    p.add_argument("--batch-sizes", default="1,128")
    p.add_argument("--merge-impl", default="triton")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    gm = set_backend(convert(create_model(a.model).eval(), a.recipe), "auto").cuda().half()
    set_merge_impl(gm, a.merge_impl)
    result = {}
    for bs in (int(b) for b in a.batch_sizes.split(",")):
        x = torch.randn(bs, 3, gm.cfg.img_size, gm.cfg.img_size, device="cuda", dtype=torch.half)
        times = kernel_times(gm, x)
        total = sum(t for _, t in times.values())
        merge = {k: v for k, v in times.items() if any(m in k for m in MERGE_KERNELS)}
        print(f"{a.model} {a.recipe} batch {bs}: device time {total:.0f} us per forward, {sum(1 for _ in times)} kernel kinds")
        for k, (n, t) in sorted(merge.items(), key=lambda kv: -kv[1][1]):
            print(f"  {k[:60]:60s} {n:5.1f} calls  {t:8.1f} us  ({t / n:.1f} us/call)")
        share = sum(t for _, t in merge.values()) / total if total else 0
        print(f"  merge kernels: {100 * share:.2f}% of device time")
        top = sorted(times.items(), key=lambda kv: -kv[1][1])[:8]
        for k, (n, t) in top:
            print(f"  top: {k[:70]:70s} {n:5.1f}  {t:8.1f} us")
        result[bs] = {"total_us": total, "merge_kernels": merge, "top": top}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
