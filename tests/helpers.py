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
