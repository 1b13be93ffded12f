"""``rmeeto visualize``: load a checkpoint, convert it if needed, and paint which patches each
final token holds (the drawing is :mod:`compressor.merge.visualize`); for a video model, per
frame of each clip."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .convert import ConvertedModel, convert
from .errors import RmeetoError
from .loading import as_factory, load_model
from .merge.visualize import (IMAGENET_MEAN, IMAGENET_STD, image_label, load_images, merge_sources, render_clip_merges,
                              render_merges)

__all__ = ["visualize", "VisualizeResult"]


@dataclass
class VisualizeResult:
    path: Path
    tokens: int  # final tokens, class token included
    patches: int
    notes: list[str] = field(default_factory=list)
    kind: str = "image"  # what the inputs were: "image" or "clip"


def visualize(ckpt, images, out, recipe=None, family: str = "vim", ema: bool = False, factory=None,
              factory_kwargs=None) -> VisualizeResult:
    """Load ``ckpt`` (an official checkpoint, converted with ``recipe``, default ``r031``; or a
    compressed one, used as it is), track the merges on ``images`` (file paths; for a video model
    clips: video files or folders of frames) and write the PNG ``out``. ``factory``: the model
    class of a foreign model (:func:`compressor.load_model`)."""
    if not images:
        raise RmeetoError("no images given: pass one or more image files (video models: clips)")
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
    if layout.frames:
        return _visualize_clips(gm, images, out, notes)
    if len(layout.input_shape) != 3 or layout.in_chans != 3 or layout.grid is None:
        raise RmeetoError(f"the model takes {tuple(layout.input_shape)} inputs with {layout.num_tokens} tokens: visualize "
                          "needs an RGB image model whose patches form a square grid")
    rgb, x = load_images(images, layout.img_size)
    sources = merge_sources(gm.eval(), x)
    path = render_merges(rgb, sources, layout.grid, out, titles=[image_label(p) for p in images])
    return VisualizeResult(path=path, tokens=sources.shape[1], patches=sources.shape[-1], notes=notes)


def _visualize_clips(gm, clips, out, notes) -> VisualizeResult:
    """Per-frame source maps of a video model (frame ``t · tubelet`` shown for token frame ``t``)."""
    layout = gm.layout
    if layout.in_chans != 3 or layout.grid is None:
        raise RmeetoError(f"the model takes {tuple(layout.input_shape)} clips with {layout.num_tokens} tokens: visualize "
                          "needs an RGB video model whose patches form square grids per frame")
    rgb, x = load_clips(clips, layout.frames, layout.img_size)
    sources = merge_sources(gm.eval(), x)
    shown = rgb[:, :, :: layout.frames // layout.token_frames]
    path = render_clip_merges(shown, sources, layout.grid, out, titles=[image_label(p) for p in clips])
    return VisualizeResult(path=path, tokens=sources.shape[1], patches=sources.shape[-1], notes=notes, kind="clip")


def load_clips(paths, frames: int, img_size: int):
    """Read clips (video files or folders of frames), ``frames`` frames each (the middle of each
    segment), shorter side resized to ``img_size`` (bicubic), centre crop. Returns ``(rgb in
    [0, 1], ImageNet-normalised)``, both ``(b, 3, frames, s, s)``."""
    import torch
    from torchvision.transforms import InterpolationMode, v2

    from .engine.clips import read_clip

    resize = v2.Compose([v2.Resize(img_size, InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(img_size),
                         v2.ToDtype(torch.float32, scale=True)])
    rgb = torch.stack([resize(read_clip(p, frames)).transpose(0, 1) for p in paths])  # (b, 3, T, s, s)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    return rgb, (rgb - mean) / std
