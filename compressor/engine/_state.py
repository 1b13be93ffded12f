"""The mutable state of a re-training run (kept apart so the setup helpers can build it)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ._progress import StopFlag
from .distributed import Dist

__all__ = ["TrainState", "RunLog", "FitResult"]


@dataclass
class TrainState:
    """What a training step needs, and the counters a checkpoint stores."""

    model: nn.Module  # the student as trained: DDP-wrapped when distributed
    student: nn.Module  # the bare student (evaluation, EMA, saving)
    teacher: nn.Module | None  # None with --no-distill
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    dist: Dist
    scaler: torch.amp.GradScaler | None = None
    ema: object | None = None
    mixup: object | None = None
    amp_dtype: torch.dtype | None = None
    clip_grad: float = 0.0
    log_every: int = 20
    stop: StopFlag = field(default_factory=StopFlag)
    epochs: int = 1  # planned epochs
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps so far

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @property
    def lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)


@dataclass
class RunLog:
    """What a run has produced so far (stored in the checkpoint, returned by :func:`fit`)."""

    history: list = field(default_factory=list)  # one record per epoch, as in log.jsonl
    baseline: dict = field(default_factory=dict)  # "original" / "training_free" val metrics
    best_top1: float = -1.0
    best_epoch: int = 0
    elapsed: float = 0.0  # seconds of work over all sessions of this run

    def state_dict(self) -> dict:
        return dict(history=self.history, baseline=self.baseline, best_top1=self.best_top1,
                    best_epoch=self.best_epoch, elapsed=self.elapsed)


@dataclass(frozen=True)
class FitResult:
    out_dir: str
    recipe: object
    history: list
    baseline: dict
    final: dict
    best_top1: float
    best_epoch: int
    wall_time: float
    model: nn.Module  # the re-trained student (converted graph, on the training device)
