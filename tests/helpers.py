"""Test data shared by several test modules (import as ``from helpers import ...``: pytest puts
``tests/`` on ``sys.path``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(root: Path, classes: int = 10, train: int = 8, val: int = 4, val_name: str = "val") -> Path:
    """Learnable tiny data in ImageFolder layout: each class a colour plus noise, 32x32 PNGs."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        base = rng.integers(0, 255, 3)
        for split, n in (("train", train), (val_name, val)):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def naive_merge(hidden, residual, size, r, cls, *, ordered=True, prune=False):
    """One sample: lists of float64 rows. Follows the spec's pseudo-code literally."""
    L = len(hidden)
    patches = [i for i in range(L) if i != cls]  # the class token is taken out
    metric = []
    for i in patches:
        norm = math.sqrt(sum(v * v for v in hidden[i]))
        metric.append([v / norm for v in hidden[i]])
    src = list(range(0, len(patches), 2))  # positions among the patches
    dst = list(range(1, len(patches), 2))
    best, best_dst = [], []
    for s in src:
        scores = [sum(a * b for a, b in zip(metric[s], metric[d])) for d in dst]
        j = max(range(len(dst)), key=lambda k: scores[k])
        best.append(scores[j])
        best_dst.append(dst[j])
    order = sorted(range(len(src)), key=lambda k: -best[k])
    merged = {src[k]: best_dst[k] for k in order[:r]}
    unmerged = [src[k] for k in order[r:]]
    groups = {d: [d] for d in dst}
    for s, d in merged.items():
        if not prune:
            groups[d].append(s)
    for s in unmerged:
        groups[s] = [s]
    keys = sorted(groups) if ordered else unmerged + dst

    def combine(rows, members_):
        w = sum(size[patches[k]] for k in members_)
        dim = len(rows[0])
        return [sum(size[patches[k]] * rows[patches[k]][c] for k in members_) / w for c in range(dim)]

    out_h = [combine(hidden, groups[k]) for k in keys]
    out_r = [combine(residual, groups[k]) for k in keys]
    out_s = [sum(size[patches[k]] for k in groups[k]) for k in keys]
    if cls is not None:
        if ordered:
            tp = (cls * (L - r)) // L
        else:
            n_src = math.ceil((L - 1) / 2)
            tp = (cls * (n_src - r)) // n_src
        out_h.insert(tp, list(hidden[cls]))
        out_r.insert(tp, list(residual[cls]))
        out_s.insert(tp, size[cls])
    return out_h, out_r, out_s


def make_clip_folder(root: Path, classes: int = 3, train: int = 4, val: int = 2, frames: int = 12, size: int = 32,
                     as_frames: tuple[str, ...] = ()) -> Path:
    """Learnable tiny video data: class ``c`` is a bright square moving in its own direction over
    a noisy background. Clips are MPEG-4 files written with PyAV, except for the splits named in
    ``as_frames``, which get folders of PNG frames (``<split>/<class>/<clip>/000.png``)."""
    import av

    rng = np.random.default_rng(0)
    directions = [(1, 0), (0, 1), (1, 1), (-1, 0), (0, -1), (-1, 1)]
    for c in range(classes):
        dy, dx = directions[c % len(directions)]
        for split, n in (("train", train), ("val", val)):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                y0, x0 = rng.integers(8, size - 16, 2)
                video = []
                for t in range(frames):
                    img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
                    y, x = (y0 + dy * t) % (size - 8), (x0 + dx * t) % (size - 8)
                    img[y : y + 8, x : x + 8] = (255, 200 - 60 * c % 200, 40 * c % 255)
                    video.append(img)
                if split in as_frames:
                    (d / f"clip{i}").mkdir(exist_ok=True)
                    for t, img in enumerate(video):
                        Image.fromarray(img).save(d / f"clip{i}" / f"{t:03d}.png")
                    continue
                with av.open(str(d / f"clip{i}.mp4"), "w") as out:
                    stream = out.add_stream("mpeg4", rate=8)
                    stream.width = stream.height = size
                    stream.pix_fmt = "yuv420p"
                    for img in video:
                        out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
                    out.mux(stream.encode())
    return root


def record_tokens(gm, x, blocks: str = "layers"):
    """Run ``gm`` on ``x`` (no grad) and return (output, tokens each block of ``gm.<blocks>`` sees),
    read by forward pre-hooks on the blocks."""
    import torch

    seen: list[int] = []
    children = gm.get_submodule(blocks).children()  # a plain Module in a graph copy, not a ModuleList
    hooks = [blk.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1])) for blk in children]
    try:
        with torch.no_grad():
            out = gm(x)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def lively(model, seed: int = 0):
    """Mixer weights re-drawn so the mixers' outputs matter next to the residual stream: with the
    default init (in_proj std 0.02, small Δ) a mixer adds ~1e-3 to a residual of ~1, and a
    backend's errors would vanish below the residual's rounding and prove nothing."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.layers:
            m = blk.mixer
            for lin in (m.in_proj, m.out_proj, m.x_proj, m.x_proj_b):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * lin.in_features**-0.5)
            m.dt_proj.bias.add_(2.0)
            m.dt_proj_b.bias.add_(2.0)
    return model


FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def official_as_user_file(fixture: str, folder: Path, filename: str):
    """An official-code fixture's weights saved the way a user's checkpoint holds them
    (``{"model": state_dict}`` in ``folder/filename``) → ``(path, fixture object)``; skips the
    test when the fixture is absent."""
    import pytest
    import torch

    path = FIXTURES / fixture
    if not path.exists():
        pytest.skip(f"fixture {path} is absent")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    f = Path(folder) / filename
    torch.save({"model": obj["state_dict"]}, f)
    return f, obj


def zoo_checkpoint(folder: Path, name: str = "vim_test", seed: int = 0) -> Path:
    """A checkpoint of the zoo model ``name`` (weights drawn with ``seed``) at ``folder/<name>.pth``."""
    import torch

    from compressor.models import create_model

    torch.manual_seed(seed)
    path = Path(folder) / f"{name}.pth"
    torch.save({"model": create_model(name).state_dict()}, path)
    return path


def negative_step_slices(model) -> int:
    """``Slice`` nodes of an ONNX model (top-level graph) with a negative step: flipped copies.
    Every ``steps`` input must be a constant (initializer or ``Constant`` node)."""
    import onnx

    consts = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    consts.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    count = 0
    for n in model.graph.node:
        if n.op_type == "Slice" and len(n.input) > 4 and n.input[4]:
            assert n.input[4] in consts, f"Slice {n.name}: steps not a constant"
            count += bool((consts[n.input[4]] < 0).any())
    return count
