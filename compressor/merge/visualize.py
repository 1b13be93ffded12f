"""Which image patches each final token holds, and a picture of it (the paper's Figure 5, ToMe's
``make_visualization``).

:func:`merge_sources` runs a converted model with a :class:`torch.fx.Interpreter` that, at every
:class:`~compressor.merge.module.TokenMerge` node, asks the node for its matching and applies the
same merge to a running one-hot membership tensor. :func:`render_merges` paints each final token's
patches in one colour over the image. :func:`compressor.visualize.visualize` (loading a checkpoint
and converting it) is what ``rmeeto visualize`` calls.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx

from ..errors import RmeetoError
from .bipartite import merge_source
from .module import TokenMerge

__all__ = ["merge_sources", "render_merges", "load_images", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _SourceTracker(fx.Interpreter):
    """Runs the graph; every merge node also merges ``self.source: (b, L, L0)`` (0/1 rows: which
    of the ``L0`` original tokens each current token holds) with the node's own matching."""

    def __init__(self, gm: fx.GraphModule, source: torch.Tensor):
        super().__init__(gm)
        self.source = source

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, TokenMerge):
            self.source = merge_source(module.match(args[0]), self.source)
        return super().call_module(target, args, kwargs)


@torch.no_grad()
def merge_sources(gm: fx.GraphModule, images: torch.Tensor) -> torch.Tensor:
    """``images: (b, c, h, w)`` (normalised as the model expects) → ``(b, L_final, num_patches)``
    0/1: entry ``[i, t, p]`` says that final token ``t`` holds patch ``p`` (row-major grid order).
    The class token is tracked like any token, but its column is dropped, so its row is all zero.
    In ``merge`` mode every patch is in exactly one final token; ``prune`` drops some."""
    layout = getattr(gm, "layout", None)
    if layout is None:
        raise RmeetoError("merge_sources expects a module returned by compressor.convert (or load_model of a compressed file)")
    b, L = images.shape[0], layout.num_tokens
    source = torch.eye(L, device=images.device).expand(b, L, L).contiguous()
    tracker = _SourceTracker(gm, source)
    tracker.run(images)
    source = tracker.source
    if layout.cls_index is not None:
        source = torch.cat([source[..., : layout.cls_index], source[..., layout.cls_index + 1 :]], dim=-1)
    return source


def _colours(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct, saturated RGB colours in [0, 1], shuffled so neighbours differ."""
    import matplotlib.colors as mcolors

    rng = np.random.default_rng(seed)
    hue = (np.arange(n) / max(n, 1) + rng.uniform()) % 1.0
    sat = 0.55 + 0.45 * rng.uniform(size=n)
    val = 0.75 + 0.25 * rng.uniform(size=n)
    return mcolors.hsv_to_rgb(np.stack([hue[rng.permutation(n)], sat, val], axis=-1))


def _overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``image: (h, w, 3)`` in [0, 1], ``labels: (grid, grid)`` token id per patch (-1: dropped)
    → image averaged with one colour per token, token borders drawn in white."""
    h, w, _ = image.shape
    g = labels.shape[0]
    rows = np.minimum(np.arange(h) * g // h, g - 1)
    cols = np.minimum(np.arange(w) * g // w, g - 1)
    pix = labels[rows][:, cols]  # (h, w)
    palette = np.concatenate([_colours(int(labels.max()) + 1), np.zeros((1, 3))])  # -1 → black
    out = (1 - alpha) * image + alpha * palette[pix]
    edge = np.zeros((h, w), dtype=bool)
    edge[:, 1:] |= pix[:, 1:] != pix[:, :-1]
    edge[1:, :] |= pix[1:, :] != pix[:-1, :]
    out[edge] = 1.0
    return np.clip(out, 0.0, 1.0)


def render_merges(images: torch.Tensor, sources: torch.Tensor, grid: int, path: str | os.PathLike, titles=None) -> Path:
    """Write a PNG: for each image, the original beside its patches painted by final token.

    ``images: (b, 3, h, w)`` RGB in [0, 1] (not normalised); ``sources: (b, L_final, grid²)`` from
    :func:`merge_sources`; ``titles``: optional label per image."""
    # a Figure on an Agg canvas, not pyplot: no global backend switch, no window, thread-safe
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .._io import atomic_write

    b = images.shape[0]
    if sources.shape[0] != b or sources.shape[-1] != grid * grid:
        raise RmeetoError(f"sources {tuple(sources.shape)} do not fit {b} images on a {grid}x{grid} patch grid")
    fig = Figure(figsize=(6, 3 * b))
    FigureCanvasAgg(fig)
    axes = fig.subplots(b, 2, squeeze=False)
    for i in range(b):
        img = images[i].detach().permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        src = sources[i].detach().cpu()
        held = src.sum(0) > 0  # patches still in some token (prune mode drops some)
        labels = np.where(held.numpy(), src.argmax(0).numpy(), -1).reshape(grid, grid)
        kept = int((src.sum(-1) > 0).sum())
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(titles[i] if titles else "image", fontsize=9)
        axes[i, 1].imshow(_overlay(img, labels))
        axes[i, 1].set_title(f"{kept} patch tokens after merging ({grid * grid} before)", fontsize=9)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))


def load_images(paths, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read image files: shorter side resized to ``img_size`` (bicubic), centre crop
    ``img_size``². Returns ``(rgb in [0, 1], ImageNet-normalised)``, both ``(b, 3, s, s)``."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                scale = img_size / min(im.size)
                w, h = max(img_size, round(im.width * scale)), max(img_size, round(im.height * scale))
                im = im.resize((w, h), Image.BICUBIC)
                left, top = (w - img_size) // 2, (h - img_size) // 2
                im = im.crop((left, top, left + img_size, top + img_size))
                out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
        except FileNotFoundError:
            raise RmeetoError(f"image {p} does not exist: check the path") from None
        except (UnidentifiedImageError, OSError) as e:
            raise RmeetoError(f"cannot read image {p} ({' '.join(str(e).split())}): pass a PNG/JPEG file") from None
    rgb = torch.stack(out)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return rgb, (rgb - mean) / std
