"""Device resolution: one place that turns ``--device`` into a ``torch.device`` or a one-line error."""

from __future__ import annotations

import torch

from .errors import RmeetoError

__all__ = ["resolve_device"]


def resolve_device(device: str | None, local_rank: int = 0, *, indexed: bool = True, fallback: str = "--device cpu") -> torch.device:
    """``None``/``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU. ``indexed=False``:
    only ``cpu``/``cuda``/``auto`` are accepted (commands that time one GPU pick it with
    ``CUDA_VISIBLE_DEVICES``). ``fallback``: what the error tells a user without CUDA to do."""
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RmeetoError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise RmeetoError(f"device type {dev.type!r} is not supported: use cpu or cuda")
    if not indexed and dev.index is not None:
        raise RmeetoError(f"unknown device {device!r}: choose cuda or cpu (pick the GPU with CUDA_VISIBLE_DEVICES)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RmeetoError(f"device {device} asked for but CUDA is not available here: use {fallback}")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise RmeetoError(f"device {dev} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev
