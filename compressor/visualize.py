"""``rmeeto visualize``: load a checkpoint, convert it if needed, and paint which patches each
final token holds (the drawing is :mod:`compressor.merge.visualize`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .convert import ConvertedModel, convert
from .errors import RmeetoError
from .loading import as_factory, load_model
from .merge.visualize import image_label, load_images, merge_sources, render_merges

__all__ = ["visualize", "VisualizeResult"]


@dataclass
class VisualizeResult:
    path: Path
    tokens: int  # final tokens, class token included
    patches: int
    notes: list[str] = field(default_factory=list)


def visualize(ckpt, images, out, recipe=None, family: str = "vim", ema: bool = False, factory=None,
              factory_kwargs=None) -> VisualizeResult:
    """Load ``ckpt`` (an official checkpoint, converted with ``recipe``, default ``r031``; or a
    compressed one, used as it is), track the merges on ``images`` (file paths) and write the PNG
    ``out``. ``factory``: the model class of a foreign model (:func:`compressor.load_model`)."""
    if not images:
        raise RmeetoError("no images given: pass one or more image files")
    notes = []
    factory = as_factory(factory, factory_kwargs)
    model = load_model(ckpt, family=family, ema=ema, factory=factory)
    if isinstance(model, ConvertedModel):
        gm = model
        if recipe is not None:
            notes.append(f"{ckpt} is already compressed (recipe {gm.recipe.name}): --recipe {recipe} ignored")
    else:
        gm = convert(model, recipe or "r031", factory=factory)
    layout = gm.layout
    if len(layout.input_shape) != 3 or layout.in_chans != 3 or layout.grid is None:
        raise RmeetoError(f"the model takes {tuple(layout.input_shape)} inputs with {layout.num_tokens} tokens: visualize "
                          "needs an RGB image model whose patches form a square grid")
    rgb, x = load_images(images, layout.img_size)
    sources = merge_sources(gm.eval(), x)
    path = render_merges(rgb, sources, layout.grid, out, titles=[image_label(p) for p in images])
    return VisualizeResult(path=path, tokens=sources.shape[1], patches=sources.shape[-1], notes=notes)
