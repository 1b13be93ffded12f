"""``rmeeto demo``: the whole pipeline on a tiny model and generated data, on the CPU, in minutes."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._app import command, console


class Size(str, Enum):
    small = "small"
    tiny = "tiny"


def _default_out() -> Path:
    """./rmeeto-demo, or ./rmeeto-demo-N: the first that does not exist yet."""
    out, n = Path("rmeeto-demo"), 2
    while out.exists():
        out, n = Path(f"rmeeto-demo-{n}"), n + 1
    return out


@command()
def demo(
    out: Annotated[
        Optional[Path], typer.Option("-o", "--out", help="New (or empty) output folder (default: a new ./rmeeto-demo).", show_default=False)
    ] = None,
    data: Annotated[
        Optional[Path], typer.Option(help="ImageFolder dataset (train/ + val/, 10 classes) instead of the generated one.")
    ] = None,
    size: Annotated[Size, typer.Option(help="small: vim_demo (~2-3 min on 2 cores); tiny: vim_test (< 1 min).")] = Size.small,
    epochs: Annotated[Optional[int], typer.Option(help="Base-training epochs (default: 8).", min=1)] = None,
):
    """Try R-MeeTo end to end on the CPU, no files needed: train a tiny Vision Mamba on generated
    images, merge tokens (recipe smoke) and re-train 1 epoch, export to ONNX, profile both."""
    from ..demo import run_demo

    run_demo(out if out is not None else _default_out(), data=data, size=size.value, epochs=epochs, console=console)
