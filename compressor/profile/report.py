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


def _rate(v) -> str:
    """Images/s with real precision: 0.0527, 7.41, 95.0, 1234."""
    return "-" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.3g}")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _x(v) -> str:
    return "-" if v is None else f"x{v:.2f}"


def _overhead_for(entry: dict, backend: str, batch: int) -> dict | None:
    """The merge-overhead row of this backend and batch: ``sliced`` where measured, else ``hooks``."""
    rows = [r for r in entry["merge_overhead"] if r["backend"] == backend and r["batch_size"] == batch]
    return next((r for r in rows if r.get("method") == "sliced"), rows[0] if rows else None)


def _overhead_cell(o: dict | None, long: bool = False) -> str:
    if o is None or o["overhead_fraction"] is None:
        return "-"
    value = _pct(o["overhead_fraction"])
    if o.get("within_noise"):
        return f"within noise (measured {value})" if long else "within noise"
    return f"{value} ({o['method']})"


def _speedup_cell(r: dict, long: bool = False) -> str:
    if r["speedup"] is None:
        return "-"
    if r.get("speedup_within_noise"):
        return f"within noise (measured {_x(r['speedup'])})" if long else f"{_x(r['speedup'])} (noise)"
    return _x(r["speedup"])


def _iqr(r: dict) -> str:
    q1, q3 = r.get("latency_ms_q1"), r.get("latency_ms_q3")
    return "-" if q1 is None or q3 is None else f"{q1:.2f}-{q3:.2f}"


def summary_rows(report: dict, long: bool = False) -> list[list[str]]:
    """One row per model × backend × batch size (what the terminal table and report.md show);
    ``long``: the within-noise cells keep the measured number (report.md)."""
    rows = []
    for e in report["models"]:
        for r in e["timings"]:
            status = "" if r["status"] == "ok" else f" ({r['status']})"
            rows.append([
                e["name"], r["backend"] + status, str(r["batch_size"]), _rate(r["throughput"]), _f(r["latency_ms_median"], ".2f"),
                _iqr(r), str(r["repeats"] or "-"), _speedup_cell(r, long), _f(r["peak_memory_mb"], ".0f"),
                _f(e["flops"]["gflops"], ".3f"), _overhead_cell(_overhead_for(e, r["backend"], r["batch_size"]), long),
            ])
    return rows


_SUMMARY_HEADER = ["model", "backend", "batch", "im/s", "median ms", "IQR ms", "calls", "speed-up", "peak MB", "GFLOPs",
                   "merge overhead"]


def _terminal_row(e: dict, r: dict) -> list[str]:
    o = _overhead_for(e, r["backend"], r["batch_size"])
    med, q1, q3 = r["latency_ms_median"], r.get("latency_ms_q1"), r.get("latency_ms_q3")
    spread = f"±{50 * (q3 - q1) / med:.0f}%" if med and q1 is not None and q3 is not None else "-"
    speedup = "-" if r["speedup"] is None else ("~" if r.get("speedup_within_noise") else "") + _x(r["speedup"])
    merge = "-" if o is None or o["overhead_fraction"] is None else ("noise" if o.get("within_noise") else _pct(o["overhead_fraction"]))
    return [e["name"], r["backend"], str(r["batch_size"]), _rate(r["throughput"]), _f(med, ".2f"), spread, speedup,
            _f(r["peak_memory_mb"], ".0f"), merge]


_TERMINAL_HEADER = ["model", "backend", "bs", "im/s", "ms", "spread", "speed-up", "peak MB", "merge"]


def to_table(report: dict) -> Table:
    """The terminal table: one row per model × backend × batch that ran (skips are in the notes),
    without the columns that hold nothing (peak memory on the CPU, merge overhead when not
    measured). ``ms`` is the median latency, ``spread`` half the interquartile range; ``~`` marks
    a speed-up and ``noise`` a merge overhead within the noise (report.md has the numbers)."""
    hw, st = report["hardware"], report["settings"]
    timed = [(e, r) for e in report["models"] for r in e["timings"] if r["status"] not in ("skipped", "failed")]
    rows = [_terminal_row(e, r) for e, r in timed]
    keep = [i for i in range(len(_TERMINAL_HEADER)) if i < 3 or any(row[i] != "-" for row in rows)]
    title = f"{hw['device_name']} · {st['dtype']} · ops {st['op_backend']} · merges {st.get('merge_impl_used', 'torch')}"
    if report.get("interrupted"):
        title += " · INTERRUPTED (partial)"
    calls = sorted({r["repeats"] for _, r in timed})
    caption = f"median of {calls[0]}{'' if len(calls) == 1 else f'-{calls[-1]}'} calls; " if calls else ""
    caption += "~ / noise: within the timing spread (interquartile ranges overlap)"
    table = Table(title=title, caption=caption)
    for i in keep:
        table.add_column(_TERMINAL_HEADER[i], justify="left" if i < 2 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(row[i] for i in keep), style="bold" if row[0] == report["baseline"] else None)
    return table


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def _models_md(report: dict) -> list[str]:
    dtype = report["settings"]["dtype"]
    both = dtype != "fp32"
    rows = []
    for e in report["models"]:
        acc = e["accuracy"]
        fp32 = acc and acc.get("fp32")
        t = e["tokens_per_layer"]
        row = [
            e["name"], e["role"], e["recipe"] or "-", f"{e['params'] / 1e6:.2f}", _f(e["flops"]["gflops"], ".4f"),
            _f(e["flops"]["gflops_paper"], ".4f"), _pct(e["flops"]["reduction"]), f"{t[0]} → {t[-1]}", str(len(e["merges"])),
            f"{e['reduction_ratio']:.2f}", _f(acc and acc["top1"], ".2f"), _f(acc and acc["top5"], ".2f"),
        ]
        rows.append(row + ([_f(fp32 and fp32["top1"], ".2f")] if both else []))
    header = ["model", "role", "recipe", "params (M)", "GFLOPs", "GFLOPs (paper)", "FLOPs saved", "tokens", "merges",
              "token reduction", f"top-1 ({dtype})", f"top-5 ({dtype})"] + (["top-1 (fp32)"] if both else [])
    return ["## Models", ""] + _md_table(header, rows)


def _overhead_md(report: dict) -> list[str]:
    rows = []
    for e in report["models"]:
        for r in e["merge_overhead"]:
            cell = _overhead_cell(r, long=True)
            if r["method"] == "sliced":
                spread = "-" if r.get("sliced_ms_q1") is None else f"sliced IQR {r['sliced_ms_q1']:.2f}-{r['sliced_ms_q3']:.2f} ms"
                rows.append([e["name"], "sliced", r["backend"], str(r["batch_size"]), _f(r["merged_ms"], ".2f"),
                             _f(r["sliced_ms"], ".2f"), cell, spread, _x(r["sliced_speedup"])])
            else:
                spread = (f"share IQR {_pct(r['overhead_fraction_q1'])}-{_pct(r['overhead_fraction_q3'])}, "
                          f"forward IQR {r['forward_ms_q1']:.2f}-{r['forward_ms_q3']:.2f} ms")
                rows.append([e["name"], "hooks", r["backend"], str(r["batch_size"]), _f(r["forward_ms"], ".2f"),
                             f"{r['merge_ms']:.2f} in merges", cell, spread, "-"])
    if not rows:
        return []
    header = ["model", "method", "backend", "batch", "forward ms", "sliced ms / ms in merges", "merge overhead", "spread",
              "speed-up if merging were free"]
    return ["## Merge overhead", ""] + _md_table(header, rows)


def to_markdown(report: dict, plots: dict[str, str] | None = None) -> str:
    hw, st = report["hardware"], report["settings"]
    lines = [
        "# rmeeto profile" + (" (interrupted: partial)" if report.get("interrupted") else ""), "",
        f"Measured on **{hw['device_name']}** ({hw['cpu_count']} CPUs, torch {hw['torch']}, CUDA {hw['cuda'] or '-'}), "
        f"{st['dtype']}, op backend `{st['op_backend']}`, merges `{st.get('merge_impl_used', 'torch')}`, {report['created']}. Baseline: `{report['baseline']}`; "
        f"speed-up = throughput / the baseline's, same backend and batch size, measured in the same run.", "",
        f"Batch sizes {st['batch_sizes']}, backends {st['backends']}, warm-up {st['warmup']}, repeats "
        + (f"up to {st['repeats']} within a {st['time_budget_s']:g} s budget" if st.get("time_budget_s") else str(st["repeats"]))
        + f", {st.get('threads', hw['torch_threads'])} intra-op thread(s). A difference whose interquartile ranges overlap "
        "is reported as within noise.", "",
    ]
    lines += _models_md(report)
    lines += ["## Speed", ""] + _md_table(_SUMMARY_HEADER, summary_rows(report, long=True))
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
