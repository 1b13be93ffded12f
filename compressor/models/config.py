"""Architecture description of a Vision Mamba: everything needed to rebuild one."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

CLS_POSITIONS = ("middle", "head", "none")
FAMILIES = ("vim", "videomamba")


@dataclass(frozen=True)
class VimConfig:
    """One Vision Mamba image or video model.

    ``cls_position``: ``middle`` (Vim: index ``M // 2``), ``head`` (VideoMamba: index 0) or
    ``none`` (mean pooling). ``divide_out``: Vim averages the two scan directions, VideoMamba sums.

    ``num_frames`` > 0 makes a video model (VideoMamba's ``video_sm`` layout): inputs
    ``(b, in_chans, num_frames, img_size, img_size)``, a 3-d patch embedding over ``tubelet``
    frames at a time, so ``token_frames = num_frames // tubelet`` frames of ``grid²`` patch tokens,
    frame-major after the class token at 0. ``num_frames = 0``: an image model (``tubelet`` unused).
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
    num_frames: int = 0
    tubelet: int = 1

    def __post_init__(self):
        if self.cls_position not in CLS_POSITIONS:
            raise ValueError(f"cls_position must be one of {CLS_POSITIONS}, got {self.cls_position!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.img_size < self.patch_size:
            raise ValueError(f"img_size {self.img_size} is smaller than patch_size {self.patch_size}")
        if self.num_frames < 0 or self.tubelet < 1:
            raise ValueError(f"num_frames must be >= 0 and tubelet >= 1, got {self.num_frames} / {self.tubelet}")
        if self.num_frames:
            if self.num_frames % self.tubelet:
                raise ValueError(f"num_frames {self.num_frames} is not a multiple of the tubelet {self.tubelet}")
            if self.family != "videomamba" or self.cls_position != "head":
                raise ValueError("video models (num_frames > 0) are VideoMamba's: family 'videomamba', class token at the head")

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
    def is_video(self) -> bool:
        return self.num_frames > 0

    @property
    def token_frames(self) -> int:
        """Frames of patch tokens: ``num_frames // tubelet`` for video, 1 for images."""
        return self.num_frames // self.tubelet if self.num_frames else 1

    @property
    def frame_patches(self) -> int:
        """Patch tokens of one (token) frame: ``grid²``."""
        return self.grid * self.grid

    @property
    def num_patches(self) -> int:
        return self.token_frames * self.frame_patches

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input without the batch axis: ``(C, H, W)``, or ``(C, T, H, W)`` for video."""
        frames = (self.num_frames,) if self.num_frames else ()
        return (self.in_chans, *frames, self.img_size, self.img_size)

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
