"""``compress(ckpt, recipe, out_dir)``: an official checkpoint → ``out_dir/compressed.pt``.

Load (shapes → architecture), convert with the recipe's merges, optionally re-train (the engine's
job; see :func:`_retrain`), write the compressed checkpoint atomically and print what the merges do
to the token count.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from .convert import ConvertedModel, convert, save_compressed
from .errors import RmeetoError
from .merge.schedule import MergeStep, cls_per_layer, reduction_ratio, tokens_per_layer
from .recipes import Recipe, load_recipe

__all__ = ["compress", "summary_table", "COMPRESSED_NAME"]

COMPRESSED_NAME = "compressed.pt"


def compress(
    ckpt: str | os.PathLike,
    recipe: str | os.PathLike | Recipe,
    out_dir: str | os.PathLike,
    *,
    family: str = "vim",
    ema: bool = False,
    factory=None,
    factory_kwargs=None,
    retrain_epochs: int = 0,
    console: Console | None = None,
    quiet: bool = False,
    **kw,
) -> Path:
    """Convert the model in ``ckpt`` with ``recipe`` (a name, a ``.toml`` path or a
    :class:`~compressor.recipes.Recipe`) and write ``out_dir/compressed.pt``; returns its path.

    ``family``/``ema`` select how the official checkpoint is read; ``factory`` (``pkg.module:callable``,
    with ``factory_kwargs``) builds the user's own model class for it instead of rmeeto's, and is
    stored so that the result can be rebuilt. ``extra`` in the file records the
    source checkpoint, the family and the merge schedule. ``retrain_epochs > 0`` re-trains the
    merged model (needs ``data=...``). A summary table goes to ``console`` unless ``quiet``.
    """
    from .loading import as_factory, load_model

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if retrain_epochs < 0:
        raise RmeetoError(f"retrain_epochs must be >= 0, got {retrain_epochs}")
    if retrain_epochs > 0 and kw.get("data") is None:
        raise RmeetoError("re-training (--retrain-epochs > 0) needs --data (an ImageFolder dataset); or pass --retrain-epochs 0")
    factory = as_factory(factory, factory_kwargs)
    model = load_model(ckpt, family=family, ema=ema, factory=factory)
    if isinstance(model, ConvertedModel):
        raise RmeetoError(f"{ckpt} is already compressed (recipe {model.recipe.name}): pass the original checkpoint")
    out_dir = _writable_dir(out_dir)
    gm, retrained = convert(model, recipe, factory=factory), None
    if retrain_epochs > 0:
        gm, retrained = _retrain(gm, model, recipe, retrain_epochs, out_dir=out_dir, console=console, **kw)
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes and prints
            return out_dir / COMPRESSED_NAME
    extra = {
        "source_checkpoint": str(Path(ckpt).resolve()),
        "family": model.cfg.family if gm.cfg is not None else "foreign",
        "ema": ema,
        "retrain_epochs": retrain_epochs,
        "retrain": retrained,
        "schedule": [asdict(s) for s in gm.steps],
    }
    path = out_dir / COMPRESSED_NAME
    save_compressed(gm.eval(), path, extra=extra)
    if not quiet:
        (console or Console()).print(summary_table(gm.layout, gm.steps, recipe, title=f"{recipe.name}: {path}"))
    return path


def _retrain(gm: ConvertedModel, teacher, recipe: Recipe, epochs: int, *, out_dir, console=None, data=None,
             **kw) -> tuple[ConvertedModel, dict]:
    """Re-train the merged model (student ``gm``, unmerged ``teacher``): the one place where
    ``compressor.engine.fit`` plugs in. ``kw``: fit's options (batch_size, lr, distill, resume,
    device, num_workers, seed); None keeps the recipe's value."""
    from .engine import fit

    result = fit(gm, teacher, recipe, data, out_dir, epochs=epochs, console=console, **kw)
    summary = {  # recorded in compressed.pt's extra
        "final": result.final, "baseline": result.baseline, "best_top1": result.best_top1,
        "best_epoch": result.best_epoch, "wall_time_s": result.wall_time,
    }
    return result.model, summary


def _writable_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` if needed and check a file can be written there (before converting and
    re-training, not after)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise RmeetoError(f"cannot write to output directory {out_dir} ({reason}): choose a writable -o/--out") from None
    return out_dir


def summary_table(layout, steps: list[MergeStep], recipe: Recipe, title: str = "") -> Table:
    """Tokens and class-token position per run of layers, and the reduction ratio. ``layout``:
    a :class:`~compressor.fx.TokenLayout` (or a VimConfig: the same fields)."""
    L, depth = layout.num_tokens, layout.depth
    tokens, cls = tokens_per_layer(steps, L, depth), cls_per_layer(steps, layout.cls_index, depth)
    table = Table(title=title or recipe.name, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("layers")
    table.add_column("tokens", justify="right")
    table.add_column("removed", justify="right")
    table.add_column("class token", justify="right")
    start = 0
    for i in range(1, depth + 1):
        if i == depth or tokens[i] != tokens[start] or cls[i] != cls[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            removed = L - tokens[start]
            table.add_row(span, str(tokens[start]), str(removed) if removed else "-", "mean" if cls[start] is None else str(cls[start]))
            start = i
    ratio = reduction_ratio(steps, L, depth)
    table.caption = (
        f"{len(steps)} {recipe.merge.mode} step(s), {L} -> {tokens[-1]} tokens; "
        f"reduction ratio {ratio:.2f} (removed token-layer slots / {depth}x{L})"
    )
    return table
