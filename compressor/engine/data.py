"""Data for re-training and evaluation: an ImageFolder ``train/`` + ``val/`` pair, timm's DeiT
augmentation, Mixup/CutMix, and samplers that shard across processes and resume mid-epoch.

Layout (ImageNet or CIFAR style)::

    DIR/train/<class>/*.jpg     DIR/val/<class>/*.jpg     (``test/`` is accepted for ``val/``)

Video models (``frames > 0``) read class folders of clips instead (:mod:`.clips`): video files
or folders of frames, ``DIR/train/<class>/<clip>.mp4``.

Every problem with the layout is one :class:`~compressor.errors.RmeetoError` raised by
:func:`check_data_dir` before any model or loader is built.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from ..errors import RmeetoError, first_line
from .clips import VIDEO_EXTENSIONS, ClipFolder, ClipMixup, build_clip_eval_transform, build_clip_train_transform, is_clip

__all__ = [
    "DataSpec",
    "check_data_dir",
    "check_eval_dir",
    "build_train_transform",
    "build_eval_transform",
    "build_train_loader",
    "build_eval_loader",
    "build_mixup",
    "ResumableSampler",
    "ShardSampler",
    "auto_num_workers",
    "usable_cores",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VAL_NAMES = ("val", "test")  # test/ is CIFAR's name for the held-out split


@dataclass(frozen=True)
class DataSpec:
    """A checked data directory: where the splits are and which classes they hold."""

    root: Path
    train: Path | None
    val: Path
    classes: tuple[str, ...]


def _holds(folder: Path, clips: bool | None) -> bool:
    """Whether ``folder`` holds an image (``clips`` False), a clip (True), or either (None)."""
    entries = list(os.scandir(folder))
    images = clips is not True and any(f.name.lower().endswith(IMG_EXTENSIONS) for f in entries if f.is_file())
    return images or (clips is not False and any(is_clip(f) for f in entries))


def _classes(split: Path, clips: bool | None = False) -> tuple[str, ...]:
    """Class folders of ``split`` (sorted, as ImageFolder numbers them); each must hold an image
    (``clips`` False), a clip (True: a video file or a folder of frames) or either (None)."""
    try:
        names = sorted(e.name for e in os.scandir(split) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise RmeetoError(f"cannot read {split}: {e.strerror}; check the path and its permissions") from None
    if not names:
        raise RmeetoError(f"{split} has no class folders: expected {split}/<class>/<image> (ImageFolder layout)")
    for name in names:
        if not _holds(split / name, clips):
            what = (f"clips ({', '.join(VIDEO_EXTENSIONS[:3])}, ... or folders of frames): the model takes video clips"
                    if clips else f"images ({', '.join(IMG_EXTENSIONS[:3])}, ...)")
            raise RmeetoError(f"{split / name} holds no {what}; remove the folder or add its {'clips' if clips else 'images'}")
    return tuple(names)


def _val_split(root: Path) -> Path | None:
    return next((root / n for n in VAL_NAMES if (root / n).is_dir()), None)


def _check_classes(where: str, classes: tuple[str, ...], num_classes: int | None) -> None:
    if num_classes is not None and num_classes != len(classes):
        raise RmeetoError(
            f"{where} has {len(classes)} classes but the model's head has {num_classes}: use the data set "
            "the model was trained on (or a model whose head matches this data)"
        )


def check_data_dir(data_dir: str | os.PathLike, num_classes: int | None = None, clips: bool = False) -> DataSpec:
    """Check a re-training data directory before any work starts (one-line errors); ``clips``:
    class folders of clips (video models)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise RmeetoError(f"data directory {root} does not exist: pass a folder holding train/ and val/")
    train, val = root / "train", _val_split(root)
    if not train.is_dir() or val is None:
        missing = " and ".join(n for n, ok in (("train/", train.is_dir()), ("val/ (or test/)", val is not None)) if not ok)
        raise RmeetoError(f"data directory {root} has no {missing}: expected {root}/train/<class>/... and {root}/val/<class>/...")
    train_classes, val_classes = _classes(train, clips), _classes(val, clips)
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        diff = f"only in train/: {only_train[:3]}" if only_train else f"only in {val.name}/: {only_val[:3]}"
        raise RmeetoError(f"train/ and {val.name}/ of {root} hold different classes ({diff}): both need the same class folders")
    _check_classes(str(root), train_classes, num_classes)
    return DataSpec(root, train, val, train_classes)


def check_eval_dir(data_dir: str | os.PathLike, num_classes: int | None = None, clips: bool | None = False) -> DataSpec:
    """An evaluation directory: ``DIR/val`` (or ``DIR/test``), else ``DIR`` itself as class folders
    (of images, of clips with ``clips``, or of either with ``clips=None``)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise RmeetoError(f"data directory {root} does not exist: pass a folder holding val/ (or the class folders)")
    val = _val_split(root) or root
    classes = _classes(val, clips)
    _check_classes(str(val), classes, num_classes)
    return DataSpec(root, None, val, classes)


# --------------------------------------------------------------------------------------------
# transforms


def build_train_transform(img_size: int, retrain, no_aug: bool = False):
    """timm/DeiT training augmentation: RandomResizedCrop bicubic, flip, RandAugment, color
    jitter, random erasing (values from the recipe's ``[retrain]``). ``no_aug``: resize + center
    crop only (deterministic; for debugging and tests)."""
    from timm.data import create_transform

    if no_aug:
        return build_eval_transform(img_size, retrain.eval_crop_pct)
    return create_transform(
        img_size,
        is_training=True,
        scale=(retrain.crop_scale_min, 1.0),
        auto_augment=retrain.auto_augment or None,
        color_jitter=retrain.color_jitter or None,
        re_prob=retrain.reprob,
        re_mode="pixel",
        re_count=1,
        interpolation="bicubic",
    )


def build_eval_transform(img_size: int, crop_pct: float = 0.875):
    """Resize to ``img_size / crop_pct`` (bicubic), center crop ``img_size`` (224 from 256)."""
    from timm.data import create_transform

    return create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct)


def build_mixup(retrain, num_classes: int, clips: bool = False):
    """timm Mixup/CutMix with label smoothing (one weight and box per clip for ``clips``), or
    None when both alphas are 0."""
    if retrain.mixup <= 0 and retrain.cutmix <= 0:
        return None
    from timm.data import Mixup

    mixup = Mixup(
        mixup_alpha=retrain.mixup,
        cutmix_alpha=retrain.cutmix,
        label_smoothing=retrain.smoothing,
        num_classes=num_classes,
    )
    return ClipMixup(mixup) if clips else mixup


# --------------------------------------------------------------------------------------------
# samplers and loaders


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by ``seed + epoch``, one shard per rank) that can start at
    sample ``start`` of its shard: a run interrupted mid-epoch resumes with the same batches."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self):
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Rank ``r`` of ``n`` reads samples ``r, r + n, ...``: every sample once (no padding), so
    summed metrics over ranks are exact."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        self.indices = range(rank, length, num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and ``taskset`` narrow;
    ``os.cpu_count()`` where the platform has no affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def auto_num_workers(cap: int) -> int:
    """Loader processes when none were asked for: one per core but one (the main process
    computes on every core; more decoders than cores only contend and cost memory), at most
    ``cap``. 2 cores: 1 worker; 1 core: 0 (load in the main process)."""
    return max(0, min(cap, usable_cores() - 1))


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: workers must not die from it, the main
    # process handles it (saves a checkpoint and stops).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _image_folder(split: Path, transform):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(split), transform=transform)
    except (FileNotFoundError, OSError) as e:
        raise RmeetoError(f"cannot read the images of {split}: {first_line(e, limit=200)}") from None


def build_train_loader(spec: DataSpec, img_size: int, retrain, *, batch_size: int, num_workers: int,
                       world_size: int = 1, rank: int = 0, seed: int = 0, no_aug: bool = False,
                       pin_memory: bool = False, frames: int = 0) -> DataLoader:
    """Shuffled, sharded training loader with ``drop_last`` (Mixup needs even, full batches).
    Its ``generator`` is reseeded per epoch by the loop, so worker seeds depend on the epoch only.
    ``frames > 0``: clips of that many frames (:class:`~.clips.ClipFolder`)."""
    if frames:
        dataset = ClipFolder(spec.train, frames, build_clip_train_transform(img_size, retrain, no_aug), train=True)
    else:
        dataset = _image_folder(spec.train, build_train_transform(img_size, retrain, no_aug))
    sampler = ResumableSampler(dataset, world_size, rank, seed)
    if len(sampler) < batch_size:
        raise RmeetoError(
            f"{spec.train} has {len(dataset)} {'clips' if frames else 'images'}: fewer than one batch of {batch_size} per process "
            f"({world_size} process(es)); lower --batch-size"
        )
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
        pin_memory=pin_memory, persistent_workers=False, generator=torch.Generator(),
        worker_init_fn=_ignore_sigint if num_workers > 0 else None,
    )


def build_eval_loader(spec: DataSpec, img_size: int, crop_pct: float, *, batch_size: int, num_workers: int,
                      world_size: int = 1, rank: int = 0, pin_memory: bool = False, frames: int = 0) -> DataLoader:
    """Sharded evaluation loader in a fixed order (``frames > 0``: clips, the middle frame of
    each segment)."""
    if frames:
        dataset = ClipFolder(spec.val, frames, build_clip_eval_transform(img_size, crop_pct), train=False)
    else:
        dataset = _image_folder(spec.val, build_eval_transform(img_size, crop_pct))
    return DataLoader(
        dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), world_size, rank),
        num_workers=num_workers, drop_last=False, pin_memory=pin_memory, generator=torch.Generator().manual_seed(0),
        worker_init_fn=_ignore_sigint if num_workers > 0 else None,
    )
