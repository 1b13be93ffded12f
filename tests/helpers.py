"""Test data shared by several test modules (import as ``from helpers import ...``: pytest puts
``tests/`` on ``sys.path``)."""

from __future__ import annotations

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
