"""``rmeeto visualize CKPT IMAGE... -o merges.png``: which patches each final token holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..visualize import visualize as run_visualize
from ._app import command, console
from ._options import ModelFactory, ModelKwargs
from .info import Family


@command()
def visualize(
    ckpt: Annotated[Path, typer.Argument(help="Official Vim/VideoMamba checkpoint, or an rmeeto compressed one.", show_default=False)],
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG/JPEG); resized and centre-cropped to the model's size.", show_default=False)],
    out: Annotated[Path, typer.Option("-o", "--out", help="PNG file to write.")] = Path("merges.png"),
    recipe: Annotated[
        Optional[str],
        typer.Option(help="Recipe name or .toml path used to convert an official checkpoint (default r031); ignored for a compressed one."),
    ] = None,
    family: Annotated[
        Optional[Family],
        typer.Option(help="Model family of an official checkpoint: the two share their state_dict layout, so the file cannot tell."),
    ] = None,
    ema: Annotated[bool, typer.Option("--ema", help="Use the model_ema weights of an official checkpoint.")] = False,
    model_factory: ModelFactory = None,
    model_kwargs: ModelKwargs = None,
):
    """Draw each merged token's patches in one colour over the image, titled with its class folder (the paper's Figure 5)."""
    res = run_visualize(ckpt, images, out, recipe=recipe, family=family.value if family else "vim", ema=ema,
                        factory=model_factory, factory_kwargs=model_kwargs)
    for note in res.notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    console.print(f"wrote {res.path}: {len(images)} image(s), {res.patches} patches -> {res.tokens} tokens", highlight=False)
