"""``rmeeto eval CKPT --data DIR``: top-1 / top-5 accuracy, loss and images/s of a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..engine.evaluation import evaluate_checkpoint
from ._app import command, console
from ._options import ModelFactory, ModelKwargs
from .info import Family


@command("eval")
def eval_(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint: official Vim/VideoMamba or rmeeto compressed.pt/best.pt.", show_default=False)],
    data: Annotated[Path, typer.Option(help="Folder holding val/ (or test/), or the class folders themselves.", show_default=False)],
    batch_size: Annotated[int, typer.Option(help="Images per batch.", min=1)] = 128,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")] = None,
    family: Annotated[
        Optional[Family], typer.Option(help="Model family of an official checkpoint (default vim; the file cannot tell).")
    ] = None,
    workers: Annotated[Optional[int], typer.Option(help="Data loader worker processes (default: one per core but one, at most 4).", min=0)] = None,
    model_factory: ModelFactory = None,
    model_kwargs: ModelKwargs = None,
    crop_pct: Annotated[Optional[float], typer.Option(help="Center-crop fraction (default: the checkpoint's recipe, else 0.875).", min=0.1, max=1.0)] = None,
):
    """Evaluate a checkpoint on an ImageFolder split: top-1, top-5, loss, images/s (fp32)."""
    m = evaluate_checkpoint(ckpt, data, batch_size=batch_size, device=device,
                            family=family.value if family else "vim", num_workers=workers,
                            crop_pct=crop_pct, factory=model_factory, factory_kwargs=model_kwargs)
    table = Table(title=f"{ckpt} on {m['data']}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    rows = [
        ("top-1 (%)", f"{m['top1']:.2f}"),
        ("top-5 (%)", f"{m['top5']:.2f}"),
        ("loss", f"{m['loss']:.4f}"),
        ("images/s", f"{m['images_per_s']:.1f}"),
        ("images", str(m["images"])),
        ("recipe", m["recipe"] or "none (unmerged)"),
        ("tokens (first → last layer)", f"{m['tokens'][0]} → {m['tokens'][1]}"),
        ("device", m["device"]),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
