"""``rmeeto compress CKPT --recipe r031 -o OUTDIR``: an official checkpoint → a compressed one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..compress import compress as run_compress
from ._app import command, console
from ._options import ModelFactory, ModelKwargs
from .info import Family


@command()
def compress(
    ckpt: Annotated[Path, typer.Argument(metavar="CKPT", help="Official Vim/VideoMamba checkpoint (.pth/.pt).", show_default=False)],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output directory; compressed.pt is written there.", show_default=False)],
    recipe: Annotated[str, typer.Option(help="Built-in recipe name (rmeeto recipes) or a .toml path.")] = "r031",
    family: Annotated[
        Optional[Family],
        typer.Option(help="Model family: the two share their state_dict layout, so the file cannot tell (default vim)."),
    ] = None,
    ema: Annotated[bool, typer.Option("--ema", help="Compress the model_ema weights instead of model.")] = False,
    model_factory: ModelFactory = None,
    model_kwargs: ModelKwargs = None,
    retrain_epochs: Annotated[Optional[int], typer.Option(help="Re-training epochs after merging (default: the recipe's with --data, none without; 0: training-free).", min=0, show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option(help="ImageFolder dataset (DIR/train, DIR/val) to re-train on.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Re-training batch per process (default: the recipe's).", min=1)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Base lr for a global batch of 512, scaled linearly (default: the recipe's).")] = None,
    distill: Annotated[
        Optional[bool], typer.Option("--distill/--no-distill", help="Distil from the unmerged model (default: the recipe's).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the re-training run saved in OUT/checkpoint.pt.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if available; torchrun: cuda:LOCAL_RANK).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Data loader worker processes (default: the recipe's, at most one per core but one).", min=0)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed of the re-training run (default: the recipe's).", min=0)] = None,
):
    """Merge tokens: convert the model with a recipe and write OUT/compressed.pt; with --data also
    re-train it (the recipe's epochs, or --retrain-epochs N; OUT/ gets best.pt, checkpoint.pt,
    log.jsonl, summary.md). Options given here override the recipe's re-training settings."""
    path = run_compress(
        ckpt, recipe, out, family=family.value if family else "vim", ema=ema, factory=model_factory, factory_kwargs=model_kwargs,
        retrain_epochs=retrain_epochs,
        data=data, console=console, batch_size=batch_size, lr=lr, distill=distill, resume=resume, device=device,
        num_workers=workers, seed=seed,
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 prints
        console.print(f"wrote {path}", highlight=False)
