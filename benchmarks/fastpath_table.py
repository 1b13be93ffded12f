"""Markdown table of the inference fast path from ``benchmarks/fastpath_gpu.sh``'s two JSON files
(the Triton merge over every recipe, the reference torch merge at r031), as in docs/benchmarks.md.

    python benchmarks/fastpath_table.py benchmarks/results/fastpath_h200_triton.json \
        benchmarks/results/fastpath_h200_torch.json
"""

from __future__ import annotations

import json
import sys

RECIPES = ("r014", "r031", "r042", "r056")


def _index(path: str) -> tuple[dict, dict]:
    d = json.load(open(path))
    return d["hardware"], {(r["model"], r["batch"], r["mode"], r["recipe"]): r for r in d["rows"]}


def _x(v) -> str:
    return "-" if v is None else f"x{v:.2f}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def table(fast_path: str, torch_path: str) -> str:
    hw, fast = _index(fast_path)
    _, ref = _index(torch_path)
    lines = [
        f"Card: {hw['device_name']}, torch {hw['torch']}, fp16, mamba-ssm + causal-conv1d kernels, random weights.", "",
        "| model | batch | mode | plain | " + " | ".join(RECIPES) + " | merge overhead r031 | bound r031 | torch merge r031 (overhead) |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in RECIPES) + " | --- | --- | --- |",
    ]
    for model, batch, mode in sorted({k[:3] for k in fast}, key=lambda k: (k[0], -k[1], k[2])):
        plain = fast[(model, batch, mode, "none")]
        plain_s = f"{plain['images_per_s']:.0f} im/s" if batch > 1 else f"{plain['ms']:.2f} ms"
        r031 = fast.get((model, batch, mode, "r031"), {})
        t = ref.get((model, batch, mode, "r031"), {})
        lines.append(
            f"| {model} | {batch} | {mode} | {plain_s} | "
            + " | ".join(_x(fast.get((model, batch, mode, r), {}).get("speedup")) for r in RECIPES)
            + f" | {_pct(r031.get('merge_overhead'))} | {_x(r031.get('sliced_speedup'))} | "
            f"{_x(t.get('speedup'))} ({_pct(t.get('merge_overhead'))}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(*sys.argv[1:3]))
