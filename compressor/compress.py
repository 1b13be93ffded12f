"""``compress(ckpt, recipe, out_dir)``: an official checkpoint → ``out_dir/compressed.pt``.

Load (shapes → architecture), convert with the recipe's merges, optionally re-train (the engine's
job; see :func:`_retrain`), write the compressed checkpoint atomically and print what the merges do
to the token count.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from ._io import check_out_dir, make_out_dir
from .convert import ConvertedModel, convert, save_compressed
from .errors import RmeetoError
from .merge.schedule import MergeStep, cls_per_layer, reduction_ratio, tokens_per_layer
from .recipes import Recipe, load_recipe

__all__ = ["compress", "resolve_epochs", "summary_table", "COMPRESSED_NAME"]

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
    retrain_epochs: int | None = None,
    console: Console | None = None,
    quiet: bool = False,
    **kw,
) -> Path:
    """Convert the model in ``ckpt`` with ``recipe`` (a name, a ``.toml`` path or a
    :class:`~compressor.recipes.Recipe`) and write ``out_dir/compressed.pt``; returns its path.

    ``family``/``ema`` select how the official checkpoint is read; ``factory`` (``pkg.module:callable``,
    with ``factory_kwargs``) builds the user's own model class for it instead of rmeeto's, and is
    stored so that the result can be rebuilt. ``extra`` in the file records the
    source checkpoint, the family and the merge schedule. ``retrain_epochs``: None re-trains the
    recipe's epochs when ``data=...`` is given and none without; 0 is training-free; N > 0 needs
    ``data``. Every input is checked before ``out_dir`` is created. A summary table goes to
    ``console`` unless ``quiet``.
    """
    from .loading import as_factory, load_model

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    epochs = resolve_epochs(retrain_epochs, recipe, kw.get("data"))
    check_out_dir(out_dir)
    factory = as_factory(factory, factory_kwargs)
    model = load_model(ckpt, family=family, ema=ema, factory=factory)
    if isinstance(model, ConvertedModel):
        raise RmeetoError(f"{ckpt} is already compressed (recipe {model.recipe.name}): pass the original checkpoint")
    gm, retrained = convert(model, recipe, factory=factory), None
    if epochs > 0:
        if not quiet and retrain_epochs is None:
            (console or Console()).print(f"re-training {epochs} epoch(s), the recipe's ({recipe.name}); "
                                         "--retrain-epochs 0 writes the training-free model", highlight=False, soft_wrap=True)
        gm, retrained = _retrain(gm, model, recipe, epochs, out_dir=out_dir, console=console, **kw)
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes and prints
            return Path(out_dir) / COMPRESSED_NAME
    out_dir = make_out_dir(out_dir)
    extra = {
        "source_checkpoint": str(Path(ckpt).resolve()),
        "family": model.cfg.family if gm.cfg is not None else "foreign",
        "ema": ema,
        "retrain_epochs": epochs,
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


def resolve_epochs(retrain_epochs: int | None, recipe: Recipe, data) -> int:
    """Re-training epochs: the recipe's when ``data`` is given and ``retrain_epochs`` is None, 0
    (training-free) without data; an explicit value as given (N > 0 needs data)."""
    if retrain_epochs is None:
        return recipe.retrain.epochs if data is not None else 0
    if retrain_epochs < 0:
        raise RmeetoError(f"retrain_epochs must be >= 0, got {retrain_epochs}")
    if retrain_epochs > 0 and data is None:
        raise RmeetoError("re-training (--retrain-epochs > 0) needs --data (an ImageFolder dataset); or pass --retrain-epochs 0")
    return retrain_epochs


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
