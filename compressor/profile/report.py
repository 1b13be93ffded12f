"""A profile report as files (``report.json``, ``report.md``, PNG plots) and as a rich table."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from .._io import atomic_write_text
from .plots import write_plots

__all__ = ["write_report", "to_markdown", "to_table", "summary_rows"]


def _f(v, fmt: str = ".1f", none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _x(v) -> str:
    return "-" if v is None else f"x{v:.2f}"


def _overhead_for(entry: dict, backend: str, batch: int) -> dict | None:
    for r in entry["merge_overhead"]:
        if r.get("method") == "sliced" and r["backend"] == backend and r["batch_size"] == batch:
            return r
    return None


def summary_rows(report: dict) -> list[list[str]]:
    """One row per model × backend × batch size (what the terminal table and report.md show)."""
    rows = []
    for e in report["models"]:
        for r in e["timings"]:
            o = _overhead_for(e, r["backend"], r["batch_size"])
            status = "" if r["status"] == "ok" else f" ({r['status']})"
            rows.append([
                e["name"], r["backend"] + status, str(r["batch_size"]), _f(r["throughput"]), _f(r["latency_ms_median"], ".2f"),
                _f(r["latency_ms_p90"], ".2f"), _x(r["speedup"]), _f(r["peak_memory_mb"], ".0f"),
                _f(e["flops"]["gflops"], ".3f"), _pct(o["overhead_fraction"]) if o else "-",
            ])
    return rows


_SUMMARY_HEADER = ["model", "backend", "batch", "im/s", "median ms", "p90 ms", "speed-up", "peak MB", "GFLOPs", "merge overhead"]


_SHORT_HEADER = ["model", "backend", "bs", "im/s", "ms", "p90 ms", "speed-up", "peak MB", "GFLOPs", "merge"]


def to_table(report: dict) -> Table:
    """The terminal table: the summary rows of the backends that ran (skips are in the notes),
    without the columns that hold nothing (peak memory on the CPU, merge overhead when not
    measured) and without GFLOPs (in report.md). ``ms`` is the median latency."""
    hw, st = report["hardware"], report["settings"]
    rows = [r for r in summary_rows(report) if "(skipped)" not in r[1] and "(failed)" not in r[1]]
    drop = {_SUMMARY_HEADER.index("GFLOPs")}
    drop |= {i for i in range(3, len(_SUMMARY_HEADER)) if all(r[i] == "-" for r in rows)}
    keep = [i for i in range(len(_SUMMARY_HEADER)) if i not in drop]
    table = Table(title=f"{hw['device_name']} · {st['dtype']} · ops {st['op_backend']} · merges {st.get('merge_impl_used', 'torch')}")
    for i in keep:
        table.add_column(_SHORT_HEADER[i], justify="left" if i < 2 else "right", no_wrap=i < 2)
    for row in rows:
        table.add_row(*(row[i] for i in keep), style="bold" if row[0] == report["baseline"] else None)
    return table


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def _models_md(report: dict) -> list[str]:
    rows = []
    for e in report["models"]:
        acc = e["accuracy"]
        t = e["tokens_per_layer"]
        rows.append([
            e["name"], e["role"], e["recipe"] or "-", f"{e['params'] / 1e6:.2f}", _f(e["flops"]["gflops"], ".4f"),
            _f(e["flops"]["gflops_paper"], ".4f"), _pct(e["flops"]["reduction"]), f"{t[0]} → {t[-1]}", str(len(e["merges"])),
            f"{e['reduction_ratio']:.2f}", _f(acc and acc["top1"], ".2f"), _f(acc and acc["top5"], ".2f"),
        ])
    header = ["model", "role", "recipe", "params (M)", "GFLOPs", "GFLOPs (paper)", "FLOPs saved", "tokens", "merges",
              "token reduction", "top-1", "top-5"]
    return ["## Models", ""] + _md_table(header, rows)


def _overhead_md(report: dict) -> list[str]:
    rows = []
    for e in report["models"]:
        for r in e["merge_overhead"]:
            if r["method"] == "sliced":
                rows.append([e["name"], "sliced", r["backend"], str(r["batch_size"]), _f(r["merged_ms"], ".2f"),
                             _f(r["sliced_ms"], ".2f"), _pct(r["overhead_fraction"]), _x(r["sliced_speedup"])])
            else:
                rows.append([e["name"], "hooks", r["backend"], str(r["batch_size"]), _f(r["forward_ms"], ".2f"),
                             f"{r['merge_ms']:.2f} in merges", _pct(r["overhead_fraction"]), "-"])
    if not rows:
        return []
    header = ["model", "method", "backend", "batch", "forward ms", "sliced ms / ms in merges", "merge overhead",
              "speed-up if merging were free"]
    return ["## Merge overhead", ""] + _md_table(header, rows)


def to_markdown(report: dict, plots: dict[str, str] | None = None) -> str:
    hw, st = report["hardware"], report["settings"]
    lines = [
        "# rmeeto profile", "",
        f"Measured on **{hw['device_name']}** ({hw['cpu_count']} CPUs, torch {hw['torch']}, CUDA {hw['cuda'] or '-'}), "
        f"{st['dtype']}, op backend `{st['op_backend']}`, merges `{st.get('merge_impl_used', 'torch')}`, {report['created']}. Baseline: `{report['baseline']}`; "
        f"speed-up = throughput / the baseline's, same backend and batch size, measured in the same run.", "",
        f"Batch sizes {st['batch_sizes']}, backends {st['backends']}, warm-up {st['warmup']}, repeats {st['repeats']}.", "",
    ]
    lines += _models_md(report)
    lines += ["## Speed", ""] + _md_table(_SUMMARY_HEADER, summary_rows(report))
    lines += _overhead_md(report)
    depth_rows = [[e["name"], " ".join(str(n) for n in e["tokens_per_layer"])] for e in report["models"]]
    lines += ["## Tokens per layer", ""] + _md_table(["model", "tokens at layers 0.."], depth_rows)
    if plots:
        lines += ["## Plots", ""] + [f"![{k}]({Path(p).name})" for k, p in plots.items()] + [""]
    lines += ["## Methods", ""] + [f"- **{k}**: {v}" for k, v in report["methods"].items()] + [""]
    notes = report["notes"] + [f"{e['name']}: {n}" for e in report["models"] for n in e["notes"]]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | Path) -> dict[str, str]:
    """Write plots, ``report.md`` and ``report.json`` (each atomically) into ``out_dir``; returns
    ``{kind: path}`` (also stored in the JSON under ``outputs``)."""
    out_dir = Path(out_dir)
    plots = write_plots(report, out_dir)
    md = atomic_write_text(out_dir / "report.md", to_markdown(report, plots))
    outputs = {"json": str(out_dir / "report.json"), "markdown": str(md), **{f"plot_{k}": v for k, v in plots.items()}}
    report["outputs"] = outputs
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    return outputs
