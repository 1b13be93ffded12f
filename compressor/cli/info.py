"""``rmeeto info CKPT``: what a checkpoint holds and how rmeeto reads it."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..models.checkpoint import describe_checkpoint
from ._app import command, console


class Family(str, Enum):
    vim = "vim"
    videomamba = "videomamba"


@command()
def info(
    ckpt: Annotated[Path, typer.Argument(metavar="CKPT", help="Checkpoint file (.pth/.pt): official Vim/VideoMamba or rmeeto.", show_default=False)],
    family: Annotated[
        Optional[Family],
        typer.Option(help="Model family: the two share their state_dict layout, so the file cannot tell."),
    ] = None,
    ema: Annotated[bool, typer.Option("--ema", help="Describe the model_ema weights instead of model.")] = False,
):
    """Show the architecture inferred from a checkpoint, its size and how it would run here."""
    d = describe_checkpoint(ckpt, family=family.value if family else None, ema=ema)
    table = Table(title=f"{ckpt}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for name, value in _rows(d):
        table.add_row(name, value)
    console.print(table)
    if d.get("ambiguity"):
        console.print(f"[yellow]note:[/yellow] {d['ambiguity']} (read as vim here)", highlight=False)


def _rows(d: dict) -> list[tuple[str, str]]:
    rows = [("top-level keys", ", ".join(d["top_level_keys"]))]
    if d["rmeeto_format"] is not None:
        rows += [("format", f"rmeeto compressed, version {d['rmeeto_format']}"), ("family", str(d["family"]))]
    else:
        cfg = d["config"]
        family = f"{cfg.family} (assumed)" if d["ambiguous"] else cfg.family
        cls = "none (mean pooling)" if d["cls_index"] is None else f"{d['cls_index']} ({d['cls_position']})"
        rows += [
            ("family", family),
            ("embed dim", str(cfg.embed_dim)),
            ("depth", str(cfg.depth)),
            ("d_state / expand / dt_rank", f"{cfg.d_state} / {cfg.expand} / {cfg.rank}"),
            ("image / patch / stride", f"{cfg.img_size} / {cfg.patch_size} / {cfg.stride}"),
            ("tokens", f"{d['tokens']} ({cfg.grid}x{cfg.grid} patches)"),
            ("class token", cls),
            ("classes", str(cfg.num_classes)),
            ("parameters", f"{d['parameters']:,}"),
        ]
        if d["note"]:
            rows.append(("loading", d["note"]))
    rows += [
        ("model_ema", "yes (--ema)" if d["has_ema"] else "no"),
        ("epoch", "-" if d["epoch"] is None else str(d["epoch"])),
        ("args.model", d["model_name"] or "-"),
        ("backend auto", d["backend"]),
        ("merges auto", d["merge_impl"]),
    ]
    return rows
