"""Architecture description of a Vision Mamba: everything needed to rebuild one."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

CLS_POSITIONS = ("middle", "head", "none")
FAMILIES = ("vim", "videomamba")


@dataclass(frozen=True)
class VimConfig:
    """One Vision Mamba image model.

    ``cls_position``: ``middle`` (Vim: index ``M // 2``), ``head`` (VideoMamba: index 0) or
    ``none`` (mean pooling). ``divide_out``: Vim averages the two scan directions, VideoMamba sums.
    """

    embed_dim: int = 192
    depth: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0 = ceil(embed_dim / 16), as the official models
    img_size: int = 224
    patch_size: int = 16
    stride: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    cls_position: str = "middle"
    divide_out: bool = True
    drop_path_rate: float = 0.1
    norm_eps: float = 1e-5
    family: str = "vim"

    def __post_init__(self):
        if self.cls_position not in CLS_POSITIONS:
            raise ValueError(f"cls_position must be one of {CLS_POSITIONS}, got {self.cls_position!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.img_size < self.patch_size:
            raise ValueError(f"img_size {self.img_size} is smaller than patch_size {self.patch_size}")

    @property
    def rank(self) -> int:
        return self.dt_rank or math.ceil(self.embed_dim / 16)

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def grid(self) -> int:
        return (self.img_size - self.patch_size) // self.stride + 1

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (self.cls_position != "none")

    @property
    def cls_index(self) -> int | None:
        """Where the class token sits in the unmerged sequence (``None`` without one)."""
        return {"middle": self.num_patches // 2, "head": 0, "none": None}[self.cls_position]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VimConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        return cls(**d)

    def replace(self, **kw) -> "VimConfig":
        return replace(self, **kw)
