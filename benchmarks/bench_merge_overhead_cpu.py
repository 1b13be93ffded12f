"""Share of a compressed forward spent in the merge ops, on CPU (issue: merge overhead ≤ 3%).

Builds ``--model`` (random weights), converts it with ``--recipe``, and times each TokenMerge
module with forward pre/post hooks (perf_counter; CPU ops are synchronous) over ``--repeats``
forwards after one warm-up. Prints the merge time, the forward time and their ratio.

    python benchmarks/bench_merge_overhead_cpu.py --model vim_tiny --recipe r031 --batch 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor import convert, create_model, set_backend  # noqa: E402
from compressor.merge import TokenMerge  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vim_tiny")
    p.add_argument("--recipe", default="r031")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    gm = set_backend(convert(create_model(a.model).eval(), a.recipe), a.backend)
    spent, start = [0.0], {}

    def pre(mod, args):
        start[mod] = time.perf_counter()

    def post(mod, args, out):
        spent[0] += time.perf_counter() - start[mod]

    merges = [m for m in gm.modules() if isinstance(m, TokenMerge)]
    for m in merges:
        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)
    x = torch.randn(a.batch, 3, gm.cfg.img_size, gm.cfg.img_size)
    totals, merge_t = [], []
    with torch.no_grad():
        for i in range(a.repeats + 1):
            spent[0] = 0.0
            t0 = time.perf_counter()
            gm(x)
            if i:  # the first forward is a warm-up
                totals.append(time.perf_counter() - t0)
                merge_t.append(spent[0])
    total, merge = statistics.median(totals), statistics.median(merge_t)
    res = {"model": a.model, "recipe": a.recipe, "batch": a.batch, "threads": a.threads, "merges": len(merges),
           "forward_s": total, "merge_s": merge, "merge_share": merge / total, "cpu": torch.backends.cpu.get_cpu_capability()}
    print(f"{a.model} {a.recipe} batch {a.batch}, {a.threads} thread(s), {len(merges)} merges: forward {total * 1e3:.1f} ms, "
          f"merges {merge * 1e3:.2f} ms = {100 * merge / total:.2f}% of the forward")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
