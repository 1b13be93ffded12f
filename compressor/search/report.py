"""The search's outputs: ``report.json`` (every schedule tried), ``report.md`` and ``pareto.png``
(speed-up against quality, the Pareto set, the compared recipes and the found schedule)."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from .._io import atomic_write, atomic_write_text

__all__ = ["write_report", "to_markdown", "plot_pareto", "METRIC_LABELS"]

METRIC_LABELS = {"agreement": "top-1 agreement with the unmerged model", "kl": "KL(unmerged || merged)",
                 "top1": "top-1 accuracy"}


def _metric(c: dict, objective: str) -> float:
    return c["quality"][objective]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _x(v) -> str:
    return "-" if v is None else f"x{v:.3f}"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def plot_pareto(report: dict, path: Path) -> Path:
    """Speed-up (x) against the objective's metric (y): every schedule scored (predicted speed),
    the Pareto set, whole-model timings (filled, joined to their prediction), compared recipes,
    the found schedule and the target."""
    obj = report["objective"]
    cands = report["candidates"]
    fig = Figure(figsize=(8, 5.5))
    ax = fig.add_subplot(1, 1, 1)
    y = [_metric(c, obj) for c in cands]
    ax.scatter([c["predicted_speedup"] for c in cands], y, s=10, color="0.7", label="scored (predicted speed)", zorder=1)
    front = sorted((c for c in cands if c["pareto"]), key=lambda c: c["predicted_speedup"])
    ax.plot([c["predicted_speedup"] for c in front], [_metric(c, obj) for c in front], color="tab:blue", lw=1.2,
            marker="o", ms=3, label="Pareto set (predicted)", zorder=2)
    timed = [c for c in cands if c["measured_speedup"] is not None]
    for c in timed:
        ax.plot([c["predicted_speedup"], c["measured_speedup"]], [_metric(c, obj)] * 2, color="tab:gray", lw=0.8, zorder=2)
    ax.scatter([c["measured_speedup"] for c in timed], [_metric(c, obj) for c in timed], s=22, color="black",
               label="timed whole (measured)", zorder=3)
    for c in cands:
        if c["marks"] and c["marks"] != ["none"]:
            sx = c["measured_speedup"] or c["predicted_speedup"]
            ax.scatter([sx], [_metric(c, obj)], marker="^", s=60, color="tab:orange", zorder=4)
            ax.annotate(", ".join(c["marks"]), (sx, _metric(c, obj)), textcoords="offset points", xytext=(5, -10), fontsize=8)
    best = report["best"]
    if best is not None:
        ax.scatter([best["measured_speedup"]], [_metric(best, obj)], marker="*", s=220, color="tab:red",
                   label=f"found: {_x(best['measured_speedup'])}", zorder=5)
    ax.axvline(report["target"]["required_speedup"], color="tab:red", ls="--", lw=1,
               label=f"target {_x(report['target']['required_speedup'])}")
    ax.scatter([], [], marker="^", color="tab:orange", label="compared recipes (measured)")
    if obj == "kl":
        ax.set_yscale("symlog", linthresh=1e-3)
    else:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel(f"speed-up over the plain model (batch {report['settings']['batch_size']})")
    ax.set_ylabel(METRIC_LABELS[obj])
    hw = report["hardware"]
    ax.set_title(f"rmeeto search: {report['model']['name']} on {hw['device_name']} ({report['settings']['dtype']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))


def _row(c: dict) -> list[str]:
    q = c["quality"]
    return [f"#{c['index']}", ", ".join(c["marks"]) or "-", c["schedule_text"], str(c["tokens_last"]),
            _x(c["predicted_speedup"]), _x(c["measured_speedup"]), _pct(q["agreement"]), f"{q['kl']:.4f}",
            _pct(q["top1"]), c["origin"]]


_HEADER = ["#", "recipe", "schedule {layer: tokens}", "last tokens", "predicted", "measured", "agreement", "KL",
           "top-1", "origin"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return out + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def to_markdown(report: dict, plot: str | None = None) -> str:
    hw, st, t = report["hardware"], report["settings"], report["target"]
    lines = [
        "# rmeeto search", "",
        f"**{report['model']['name']}** ({report['model']['source']}) on **{hw['device_name']}**, batch "
        f"{st['batch_size']}, {st['dtype']}, {report['timing_backend']} timing, {report['created']}.", "",
        f"Target: {report['target_text']} (goal with the {100 * t['margin']:.1f}% margin: {_x(t['goal_speedup'])}). "
        f"Quality: **{report['objective']}** on {report['calibration']}.", "",
        f"**{report['message']}**", "",
        f"{report['evals']} schedules scored in {report['elapsed_s']:.0f} s (stopped: {report['stopped']}); plain model "
        f"{report['plain_ms']:.3f} ms per batch at the start, {report['plain_ms_confirm']:.3f} ms when confirming; "
        f"prediction scale alpha = {report['alpha']:.3f}.", "",
    ]
    if plot:
        lines += [f"![Pareto]({Path(plot).name})", ""]
    if report["comparisons"]:
        rows = []
        for cmp in report["comparisons"]:
            rc, rv = report["candidates"][cmp["index"]], cmp["rival"]
            rival = report["candidates"][rv] if rv is not None else None
            rows.append([cmp["recipe"], _x(rc["measured_speedup"]), _pct(rc["quality"]["agreement"]), f"{rc['quality']['kl']:.4f}",
                         _pct(rc["quality"]["top1"]), "-" if rival is None else f"#{rival['index']} {rival['schedule_text']}",
                         "-" if rival is None else _x(rival["measured_speedup"]),
                         "-" if rival is None else _pct(rival["quality"]["agreement"]),
                         "-" if rival is None else f"{rival['quality']['kl']:.4f}", "yes" if cmp["rival_better"] else "no"])
        lines += ["## Against the compared recipes", "",
                  "Each recipe timed whole, and the best-scoring schedule found whose measured speed-up is at least "
                  "the recipe's (\"rival\").", ""]
        lines += _table(["recipe", "speed-up", "agreement", "KL", "top-1", "rival", "rival speed-up", "rival agreement", "rival KL",
                         f"rival better ({report['objective']})"], rows)
    lines += ["## Whole-model timings", ""]
    lines += _table(["schedule", "why", "predicted ms", "measured ms", "error"],
                    [[w["schedule"], w["why"], _ms(w["predicted_ms"]), _ms(w["measured_ms"]),
                      f"{100 * (w['predicted_ms'] / w['measured_ms'] - 1):+.1f}%"] for w in report["whole_timings"]])
    pareto = sorted((c for c in report["candidates"] if c["pareto"]), key=lambda c: c["predicted_speedup"])
    lines += ["## Pareto set", ""] + _table(_HEADER, [_row(c) for c in pareto])
    lines += ["## Every schedule scored", ""] + _table(_HEADER, [_row(c) for c in report["candidates"]])
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | Path) -> dict[str, str]:
    """``pareto.png``, ``report.md``, ``report.json`` in ``out_dir`` (atomically); returns the paths."""
    out_dir = Path(out_dir)
    plot = str(plot_pareto(report, out_dir / "pareto.png"))
    md = atomic_write_text(out_dir / "report.md", to_markdown(report, plot))
    outputs = {"json": str(out_dir / "report.json"), "markdown": str(md), "plot": plot}
    report["outputs"] = {**report.get("outputs", {}), **outputs}
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    return outputs
