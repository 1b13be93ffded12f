"""The end-of-run report: ``summary.md`` and the same table printed with rich."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .._io import atomic_write_text
from ..flops import count_flops
from ._progress import fmt_duration

__all__ = ["summary_rows", "write_summary", "print_summary"]

HEADER = ("model", "top-1 (%)", "top-5 (%)", "val loss", "GFLOPs", "tokens (first → last layer)")


def _gflops(cfg, steps, merge) -> float | None:
    """GFLOPs (both scan directions) of rmeeto's own models, else None (column omitted)."""
    if cfg is None:
        return None
    try:
        return float(count_flops(cfg, steps, merge=merge)["gflops_both"])
    except Exception:  # noqa: BLE001 - a report column must never fail a finished training run
        return None


def _tokens(cfg, steps) -> str:
    last = steps[-1].tokens_out if steps else cfg.num_tokens
    return f"{cfg.num_tokens} → {last}"


def _row(name: str, m: dict | None, gflops: float | None, tokens: str) -> list[str]:
    m = m or {}
    pct = lambda k: f"{m[k]:.2f}" if k in m else "-"  # noqa: E731
    return [name, pct("top1"), pct("top5"), f"{m['loss']:.4f}" if "loss" in m else "-",
            "-" if gflops is None else f"{gflops:.3f}", tokens]


def summary_rows(student, recipe, baseline: dict, final: dict, best: tuple[float, int]) -> list[list[str]]:
    """Rows: original, training-free merged, re-trained (final), best epoch."""
    cfg, steps = student.cfg, list(student.steps)
    g0, g1 = _gflops(cfg, [], None), _gflops(cfg, steps, recipe.merge)
    t0, t1 = _tokens(student.layout, []), _tokens(student.layout, steps)
    epochs = recipe.retrain.epochs
    rows = [
        _row("original", baseline.get("original"), g0, t0),
        _row(f"merged ({recipe.name}), training-free", baseline.get("training_free"), g1, t1),
        _row(f"merged ({recipe.name}), re-trained {epochs} epoch{'s' * (epochs != 1)}", final, g1, t1),
    ]
    if best[1] and best[1] != epochs:
        rows.append(_row(f"best epoch ({best[1]}), best.pt", {"top1": best[0]}, g1, t1))
    return rows


def _drop_empty_gflops(rows: list[list[str]]) -> tuple[tuple[str, ...], list[list[str]]]:
    if all(r[4] == "-" for r in rows):
        return HEADER[:4] + HEADER[5:], [r[:4] + r[5:] for r in rows]
    return HEADER, rows


def write_summary(path: Path, rows: list[list[str]], *, recipe_name: str, wall_time: float, note: str) -> None:
    header, rows = _drop_empty_gflops(rows)
    lines = [
        f"# R-MeeTo re-training: {recipe_name}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        f"Wall time: {fmt_duration(wall_time)} ({note}).",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def print_summary(console: Console, rows: list[list[str]], *, recipe_name: str, wall_time: float, note: str) -> None:
    header, rows = _drop_empty_gflops(rows)
    table = Table(title=f"R-MeeTo re-training: {recipe_name}", caption=f"wall time {fmt_duration(wall_time)} ({note})")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i in (0, len(header) - 1) else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
