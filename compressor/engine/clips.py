"""Video data for re-training and evaluating video models: class folders of clips, decoded with
PyAV, sampled to the model's frame count, augmented the same way on every frame of a clip.

Layout (Kinetics-style; a clip is a video file or a folder of frames)::

    DIR/train/<class>/<clip>.mp4            DIR/val/<class>/<clip>.mp4
    DIR/train/<class>/<clip>/000001.jpg     (frames sorted by name)

Frames are chosen by segment sampling, as the official VideoMamba / R-MeeTo ``Kinetics_sparse``
loader does: the clip is cut into ``frames`` equal segments; training takes a random frame of
each, evaluation the middle one (one view; the official test averages 4 temporal x 3 spatial views).
The transforms are torchvision's ``transforms.v2`` on the whole ``(T, C, H, W)`` clip, so one
crop, flip, RandAugment op and erased box are drawn per clip and applied to every frame.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import RmeetoError, first_line

__all__ = ["VIDEO_EXTENSIONS", "ClipFolder", "ClipMixup", "sample_indices", "read_clip", "build_clip_train_transform",
           "build_clip_eval_transform", "is_clip"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_RAND_RE = re.compile(r"^rand(-[a-z]+[\d.]+)*$")


def _frame_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS))


def is_clip(entry: os.DirEntry | Path) -> bool:
    """A video file, or a folder holding at least one image (a clip stored as frames)."""
    path = Path(entry)
    if path.is_file():
        return path.name.lower().endswith(VIDEO_EXTENSIONS)
    return path.is_dir() and not path.name.startswith(".") and any(
        f.name.lower().endswith(IMG_EXTENSIONS) for f in os.scandir(path) if f.is_file())


# --------------------------------------------------------------------------------------------
# which frames, and reading them


def sample_indices(total: int, frames: int, *, train: bool, generator: torch.Generator | None = None) -> list[int]:
    """``frames`` frame indices of a clip of ``total`` frames: one per equal segment of
    ``[0, total - 1]``, random within it (``train``) or its middle (evaluation). Clips shorter than
    ``frames`` repeat frames; the indices never decrease."""
    if total < 1 or frames < 1:
        raise ValueError(f"need total >= 1 and frames >= 1, got {total} / {frames}")
    seg = (total - 1) / frames
    out = []
    for i in range(frames):
        lo, hi = round(seg * i), round(seg * (i + 1))
        idx = lo + int(torch.randint(hi - lo + 1, (1,), generator=generator)) if train else (lo + hi) // 2
        out.append(min(idx, total - 1))
    return out


def _decode_error(path: Path, e: Exception) -> RmeetoError:
    msg = first_line(e, limit=160)
    return RmeetoError(f"cannot decode the video {path} ({msg}): re-encode it (e.g. H.264 .mp4) or store it as a folder of frames")


def _read_video(path: Path, frames: int, train: bool, generator) -> np.ndarray:
    """Decode only up to the last frame needed (sequential decoding cannot skip ahead cheaply)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # decoder threads: a clip is decoded in one go
            total = stream.frames
            if total <= 0:  # the container does not say: decode everything once
                decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
                if not decoded:
                    raise RmeetoError(f"the video {path} has no frames: remove it or re-encode it")
                return np.stack([decoded[i] for i in sample_indices(len(decoded), frames, train=train, generator=generator)])
            wanted = sample_indices(total, frames, train=train, generator=generator)
            keep, last = {}, None
            for i, f in enumerate(container.decode(stream)):
                if i in wanted:
                    keep[i] = f.to_ndarray(format="rgb24")
                last = f
                if i >= wanted[-1]:
                    break
            if last is None:
                raise RmeetoError(f"the video {path} has no frames: remove it or re-encode it")
            # a container may announce more frames than it holds: the missing ones repeat the last decoded
            missing = [i for i in wanted if i not in keep]
            fallback = last.to_ndarray(format="rgb24") if missing else None
    except (IndexError, av.FFmpegError, OSError) as e:
        raise _decode_error(path, e) from None
    return np.stack([keep.get(i, fallback) for i in wanted])


def _read_frames(folder: Path, frames: int, train: bool, generator) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    files = _frame_files(folder)
    if not files:
        raise RmeetoError(f"the clip folder {folder} holds no images: remove it or add its frames")
    out = []
    for i in sample_indices(len(files), frames, train=train, generator=generator):
        try:
            with Image.open(files[i]) as im:
                out.append(np.asarray(im.convert("RGB")))
        except (UnidentifiedImageError, OSError) as e:
            raise RmeetoError(f"cannot read the frame {files[i]} ({first_line(e, limit=120)})") from None
    if len({a.shape for a in out}) > 1:
        raise RmeetoError(f"the frames of {folder} differ in size: store one clip's frames at one resolution")
    return np.stack(out)


def read_clip(path: str | os.PathLike, frames: int, *, train: bool = False, generator=None) -> torch.Tensor:
    """``frames`` RGB frames of the clip at ``path`` (video file or folder of frames) as a uint8
    tensor ``(frames, 3, H, W)``, chosen by :func:`sample_indices`."""
    path = Path(path)
    if not path.exists():
        raise RmeetoError(f"clip {path} does not exist: check the path")
    array = _read_frames(path, frames, train, generator) if path.is_dir() else _read_video(path, frames, train, generator)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# transforms (one set of random parameters per clip)


def _rand_augment(spec: str):
    """torchvision's RandAugment from a timm-style ``rand-m9-n2-...`` string: ``m`` (of 10) and
    ``n`` ops; timm's magnitude noise (``mstd``) and ``inc`` variants have no torchvision twin."""
    from torchvision.transforms import v2

    if not _RAND_RE.match(spec):
        raise RmeetoError(f"auto_augment {spec!r}: clips support RandAugment strings such as 'rand-m9-mstd0.5-inc1' "
                          "(or \"\" for none)")
    parts = dict(re.fullmatch(r"([a-z]+)([\d.]+)", p).groups() for p in spec.split("-")[1:])
    return v2.RandAugment(num_ops=int(parts.get("n", 2)), magnitude=int(float(parts.get("m", 9))), num_magnitude_bins=11)


def _finish(steps: list):
    from torchvision.transforms import v2

    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def build_clip_eval_transform(img_size: int, crop_pct: float = 0.875):
    """``(T, 3, H, W)`` uint8 → normalised float: resize the short side to ``img_size / crop_pct``
    (bicubic), center crop ``img_size`` (as the image eval transform, on every frame)."""
    from torchvision.transforms import InterpolationMode, v2

    return _finish([v2.Resize(math.floor(img_size / crop_pct), InterpolationMode.BICUBIC, antialias=True),
                    v2.CenterCrop(img_size)])


def build_clip_train_transform(img_size: int, retrain, no_aug: bool = False):
    """The recipe's image augmentation on clips: RandomResizedCrop (bicubic), flip, RandAugment
    (else color jitter, as timm), random erasing; ``no_aug``: the eval transform."""
    from torchvision.transforms import InterpolationMode, v2

    if no_aug:
        return build_clip_eval_transform(img_size, retrain.eval_crop_pct)
    steps = [v2.RandomResizedCrop(img_size, scale=(retrain.crop_scale_min, 1.0), interpolation=InterpolationMode.BICUBIC,
                                  antialias=True), v2.RandomHorizontalFlip()]
    if retrain.auto_augment:
        steps.append(_rand_augment(retrain.auto_augment))
    elif retrain.color_jitter:
        steps.append(v2.ColorJitter(retrain.color_jitter, retrain.color_jitter, retrain.color_jitter))
    out = _finish(steps)
    if retrain.reprob > 0:  # after normalisation, random-normal pixels: timm's "pixel" mode
        out = v2.Compose([out, v2.RandomErasing(p=retrain.reprob, value="random")])
    return out


class ClipMixup:
    """timm's Mixup/CutMix on clips ``(b, C, T, H, W)``: frames folded into channels, so one
    mixing weight and one CutMix box hold for every frame of a clip."""

    def __init__(self, mixup):
        self.mixup = mixup

    def __call__(self, x: torch.Tensor, target: torch.Tensor):
        if x.dim() != 5:
            return self.mixup(x, target)
        b, c, t, h, w = x.shape
        mixed, target = self.mixup(x.reshape(b, c * t, h, w), target)
        return mixed.reshape(b, c, t, h, w), target


# --------------------------------------------------------------------------------------------
# the dataset


class ClipFolder(Dataset):
    """Clips in class folders (``split/<class>/<clip>``), ImageFolder-style: classes numbered in
    sorted order; items ``(clip (C, T, H, W) float, class index)``."""

    def __init__(self, split: str | os.PathLike, frames: int, transform, *, train: bool):
        self.root, self.frames, self.transform, self.train = Path(split), frames, transform, train
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        self.samples = [(Path(e.path), k) for k, name in enumerate(self.classes)
                        for e in sorted(os.scandir(self.root / name), key=lambda e: e.name) if is_clip(e)]
        if not self.samples:
            raise RmeetoError(f"{self.root} holds no clips ({', '.join(VIDEO_EXTENSIONS[:2])}, ... or folders of frames)")
        self.targets = [k for _, k in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        clip = read_clip(path, self.frames, train=self.train)  # torch's RNG: seeded per worker and epoch
        return self.transform(clip).transpose(0, 1).contiguous(), target
