"""Which image patches each final token holds, and a picture of it (the paper's Figure 5, ToMe's
``make_visualization``).

:func:`merge_sources` runs a converted model with a :class:`torch.fx.Interpreter` that, at every
:class:`~compressor.merge.module.TokenMerge` node, asks the node for its matching and applies the
same merge to a running one-hot membership tensor. :func:`render_merges` draws each merged token
(several patches) in one colour, outlined, over the image. :func:`compressor.visualize.visualize`
(loading a checkpoint and converting it) is what ``rmeeto visualize`` calls.
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
from .schedule import cls_positions

__all__ = ["merge_sources", "render_merges", "render_clip_merges", "merges_figure", "image_label", "load_images",
           "IMAGENET_MEAN", "IMAGENET_STD"]

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
    """``images: (b, c, h, w)`` (normalised as the model expects; clips ``(b, c, T, h, w)``) →
    ``(b, L_final, num_patches)`` 0/1: entry ``[i, t, p]`` says that final token ``t`` holds patch
    ``p`` (row-major grid order; for clips frame-major, ``p = frame · grid² + row · grid + col``).
    The class token (or both of two) is tracked like any token, but its column is dropped, so its row is all zero.
    In ``merge`` mode every patch is in exactly one final token; ``prune`` drops some."""
    layout = getattr(gm, "layout", None)
    if layout is None:
        raise RmeetoError("merge_sources expects a module returned by compressor.convert (or load_model of a compressed file)")
    b, L = images.shape[0], layout.num_tokens
    source = torch.eye(L, device=images.device).expand(b, L, L).contiguous()
    tracker = _SourceTracker(gm, source)
    tracker.run(images)
    source = tracker.source
    keep = [i for i in range(L) if i not in cls_positions(layout.cls_index)]  # one or two class tokens
    return source[..., keep] if len(keep) < L else source


def _colours(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct, saturated RGB colours in [0, 1], shuffled so neighbours differ."""
    import matplotlib.colors as mcolors

    rng = np.random.default_rng(seed)
    hue = (np.arange(n) / max(n, 1) + rng.uniform()) % 1.0
    sat = 0.55 + 0.45 * rng.uniform(size=n)
    val = 0.75 + 0.25 * rng.uniform(size=n)
    return mcolors.hsv_to_rgb(np.stack([hue[rng.permutation(n)], sat, val], axis=-1))


def _token_layer(labels: np.ndarray, size: int, alpha: float = 0.4, sizes=None) -> np.ndarray:
    """``labels: (grid, grid)`` token id per patch (-1: dropped) → an ``(size, size, 4)`` RGBA
    layer to draw over the image: each token that holds several patches in its own colour at
    ``alpha``, a white outline around it, dropped patches dark; single-patch tokens transparent
    (the image shows through where nothing was merged). ``sizes``: patches each token holds
    (default: counted in ``labels``; a clip gives its counts over all frames, so that a token keeps
    its colour and outline in every frame)."""
    g = labels.shape[0]
    idx = np.minimum(np.arange(size) * g // size, g - 1)
    pix = labels[idx][:, idx]  # (size, size) token id per pixel
    if sizes is None:
        ids, counts = np.unique(labels[labels >= 0], return_counts=True)
        merged = np.zeros(int(labels.max()) + 2, dtype=bool)  # index -1 (dropped) is the last slot
        merged[ids[counts > 1]] = True
    else:
        merged = np.append(np.asarray(sizes) > 1, False)
    palette = np.concatenate([_colours(len(merged) - 1), np.zeros((1, 3))])
    layer = np.zeros((size, size, 4))
    layer[..., :3] = palette[pix]
    layer[..., 3] = np.where(pix < 0, 0.75, np.where(merged[pix], alpha, 0.0))
    m = merged[pix]
    edge = np.zeros((size, size), dtype=bool)  # a token border with a merged token on either side
    edge[:, 1:] |= (pix[:, 1:] != pix[:, :-1]) & (m[:, 1:] | m[:, :-1])
    edge[1:, :] |= (pix[1:, :] != pix[:-1, :]) & (m[1:, :] | m[:-1, :])
    layer[edge] = (1.0, 1.0, 1.0, 1.0)
    return layer


def image_label(path) -> str:
    """A panel title for an image file: its class folder (ImageFolder layout) and its name,
    e.g. ``cat (0000.jpg)``; just the name for a file without a folder."""
    p = Path(path)
    parent = p.parent.name
    return f"{parent} ({p.name})" if parent not in ("", ".") else p.name


def render_merges(images: torch.Tensor, sources: torch.Tensor, grid: int, path: str | os.PathLike, titles=None,
                  columns: int = 4) -> Path:
    """Write :func:`merges_figure` as a PNG to ``path`` (atomically)."""
    from .._io import atomic_write

    fig = merges_figure(images, sources, grid, titles, columns)
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100, bbox_inches="tight", pad_inches=0.15))


def merges_figure(images: torch.Tensor, sources: torch.Tensor, grid: int, titles=None, columns: int = 4):
    """One panel per image: the image with its merged tokens drawn over it (one colour and a white
    outline per token that holds several patches; see :func:`_token_layer`), titled with
    ``titles[i]`` (e.g. :func:`image_label`: the class folder) and the token count.

    ``images: (b, 3, h, w)`` RGB in [0, 1] (not normalised); ``sources: (b, L_final, grid²)`` from
    :func:`merge_sources`."""
    # a Figure on an Agg canvas, not pyplot: no global backend switch, no window, thread-safe
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    b = images.shape[0]
    if sources.shape[0] != b or sources.shape[-1] != grid * grid:
        raise RmeetoError(f"sources {tuple(sources.shape)} do not fit {b} images on a {grid}x{grid} patch grid")
    cols = min(b, columns)
    rows = -(-b // cols)
    fig = Figure(figsize=(3.2 * cols, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for i in range(b):
        img = images[i].detach().permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        src = sources[i].detach().cpu()
        held = src.sum(0) > 0  # patches still in some token (prune mode drops some)
        labels = np.where(held.numpy(), src.argmax(0).numpy(), -1).reshape(grid, grid)
        sizes = src.sum(-1)
        kept, groups, dropped = int((sizes > 0).sum()), int((sizes > 1).sum()), int((~held).sum())
        axes[i].imshow(img)
        axes[i].imshow(_token_layer(labels, img.shape[0]), extent=(-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5))
        title = titles[i] if titles else f"image {i}"
        what = f"{groups} merged" + (f", {dropped} dropped" if dropped else "")
        axes[i].set_title(f"{title}\n{kept} patch tokens from {grid * grid}: {what}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    return fig


def render_clip_merges(clips: torch.Tensor, sources: torch.Tensor, grid: int, path: str | os.PathLike,
                       titles=None) -> Path:
    """Write a PNG of per-frame source maps: one row per clip, one panel per frame, each frame's
    patches drawn by the merged token that holds them (:func:`_token_layer`). A token keeps its
    colour in every frame, so one that spans frames shows where tokens merged across time.

    ``clips: (b, 3, T', h, w)`` RGB in [0, 1], one frame per token frame; ``sources: (b, L_final,
    T'·grid²)`` from :func:`merge_sources`; ``titles``: optional label per clip."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .._io import atomic_write

    b, frames = clips.shape[0], clips.shape[2]
    if sources.shape[0] != b or sources.shape[-1] != frames * grid * grid:
        raise RmeetoError(f"sources {tuple(sources.shape)} do not fit {b} clips of {frames} frames on a {grid}x{grid} grid")
    fig = Figure(figsize=(2.2 * frames, 2.6 * b), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(b, frames, squeeze=False)
    for i in range(b):
        src = sources[i].detach().cpu()
        held = src.sum(0) > 0
        labels = np.where(held.numpy(), src.argmax(0).numpy(), -1).reshape(frames, grid, grid)
        sizes = src.sum(-1).numpy()
        reach = (src.reshape(src.shape[0], frames, -1).sum(-1) > 0).sum(-1)  # frames each token reaches
        kept, spanning = int((reach > 0).sum()), int((reach > 1).sum())
        for t in range(frames):
            img = clips[i, :, t].detach().permute(1, 2, 0).clamp(0, 1).cpu().numpy()
            axes[i, t].imshow(img)
            axes[i, t].imshow(_token_layer(labels[t], img.shape[0], sizes=sizes),
                              extent=(-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5))
            axes[i, t].set_title(f"frame {t}", fontsize=8)
            axes[i, t].axis("off")
        title = titles[i] if titles else f"clip {i}"
        axes[i, 0].set_title(f"{title}: {kept} tokens from {frames * grid * grid} patches, {spanning} span frames\nframe 0",
                             fontsize=8, loc="left")
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100, bbox_inches="tight", pad_inches=0.15))


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
