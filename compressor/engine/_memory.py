"""Will one training step fit in memory? Estimated before the first step, from a probe.

A step holds what autograd keeps for the student's backward (its activations: linear in the
batch), the batch's transients (gradients of activations, the scan's tiles, the teacher's
forward), the images, and the parameters' gradients and AdamW state. The per-image part is
measured: one student forward on a probe batch of ``PROBE_BATCH`` images under
``saved_tensors_hooks`` counts the bytes autograd keeps (parameters excluded), so whatever the
backend, precision and merge schedule save is what is counted. The transients are a factor on
top, calibrated on this project's models (``benchmarks/bench_cpu_retrain.py --memory``).

What counts as free: ``MemAvailable`` of ``/proc/meminfo`` on a CPU, the device's free memory
on a GPU. A batch asked for with ``--batch-size`` must fit in ``HARD_FRACTION`` of it (beyond
that the kernel's OOM killer ends the run). The recipe's default batch is held to ``SHARE`` of
it: a CPU machine is often shared and keeps its page cache (``SHARE["cpu"]``: on the 24 GB
development box, about 5 GB for the step); a GPU is the run's own.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import RmeetoError

__all__ = ["StepMemory", "available_bytes", "probe_step_memory", "largest_fitting_batch", "fit_batch_size"]

PROBE_BATCH = 2
# peak of a step / what autograd keeps: 1.24 measured on the depth-8 dim-192 224 px model
# (r031 student + teacher, AdamW, Mixup, fp32 CPU, batch 8..128: 50 MB per image against
# 40.5 MB kept; benchmarks/bench_cpu_retrain.py --memory); 1.4 leaves a margin
TRANSIENT_FACTOR = 1.4
HARD_FRACTION = 0.9
SHARE = {"cpu": 0.25, "cuda": 0.9}
GB = 1e9


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one training step: ``per_image · batch + fixed``."""

    per_image: float  # activations kept for the backward, with transients
    fixed: float  # gradients + AdamW state of the trainable parameters

    def at(self, batch: int) -> float:
        return self.per_image * batch + self.fixed


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this process now: the CUDA device's free memory, or ``MemAvailable``
    from ``/proc/meminfo``; None where neither can be read (then nothing is checked)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def probe_step_memory(student: nn.Module, input_shape: tuple[int, ...], device: torch.device,
                      amp_dtype: torch.dtype | None = None) -> StepMemory:
    """Measure what one student forward keeps for the backward on ``PROBE_BATCH`` random inputs
    of ``input_shape`` (one input, no batch axis)
    (RNG state restored: the run stays reproducible), scale to one image, add the transients
    and the input; ``fixed``: 3 copies of the trainable parameters (gradient, AdamW's two moments)."""
    params = {p.data_ptr() for p in student.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and t.device.type == device.type:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    was_training = student.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        images = torch.randn(PROBE_BATCH, *input_shape, device=device)
        student.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            out = student(images)
        del out
    student.train(was_training)
    per_image = sum(seen.values()) / PROBE_BATCH * TRANSIENT_FACTOR + images[0].nbytes * 4  # batch, mixup, loader copies
    trainable = sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad)
    return StepMemory(per_image=per_image, fixed=3.0 * trainable)


def largest_fitting_batch(mem: StepMemory, budget: float) -> int:
    """The largest batch whose step fits in ``budget`` bytes (0 when not even one image does)."""
    if budget <= mem.fixed:
        return 0
    return max(0, int(math.floor((budget - mem.fixed) / mem.per_image)))


def fit_batch_size(batch: int, explicit: bool, mem: StepMemory, available: int | None,
                   device_type: str = "cpu") -> tuple[int, str | None]:
    """``(batch to use, note or None)``. An explicit ``batch`` whose step does not fit in
    ``HARD_FRACTION`` of ``available`` stops with one line naming a value that fits; the
    recipe's default is lowered, when its step exceeds ``SHARE`` of ``available``, to the
    largest batch that fits there (a multiple of 8 when at least 8), and the note says so."""
    if available is None:
        return batch, None
    share = HARD_FRACTION if explicit else SHARE.get(device_type, HARD_FRACTION)
    budget = share * available
    need = mem.at(batch)
    if need <= budget:
        return batch, None
    fits = largest_fitting_batch(mem, budget)
    if fits >= 8:
        fits -= fits % 8
    if fits < 1:
        raise RmeetoError(
            f"re-training needs about {mem.at(1) / GB:.1f} GB even at batch 1 and {available / GB:.1f} GB is available: "
            "free memory or use a machine with more"
        )
    where = f"about {need / GB:.1f} GB for a step, {available / GB:.1f} GB available"
    if explicit:
        raise RmeetoError(f"--batch-size {batch} does not fit in memory ({where}): pass --batch-size {fits} or lower")
    return fits, (
        f"batch {batch} (the recipe's) would take {where}: re-training with batch {fits} "
        f"(≤ {share:.0%} of the available memory; --batch-size sets it)"
    )
