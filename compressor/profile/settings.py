"""How a profile measures: :class:`ProfileSettings`, with defaults sized to the device.

A GPU forward takes milliseconds, so CUDA defaults are generous (4 batch sizes, eager and one CUDA
graph, 5 warm-up and 30 timed calls, both merge-overhead methods). A CPU forward of a 224 px model
takes about a second per image pair and the machine is often shared, so CPU defaults are sized to
finish in a couple of minutes: batch sizes 1 and 8, eager only (CUDA graphs do not exist there),
one warm-up call, as many timed calls (3 to 30) as fit a time budget, the ``hooks`` overhead
method only (measured inside the same forward, where the ``sliced`` method needs a second series
whose difference to the first is usually below CPU noise), and one intra-op thread when the
machine is busy (two OpenMP threads fighting other work made a forward 10x slower here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from .._device import resolve_device
from .. import ops
from ..errors import RmeetoError
from ..merge import MERGE_IMPLS
from ..merge import fast as fast_merge
from .timing import EXEC_BACKENDS

__all__ = ["DTYPES", "OVERHEAD_METHODS", "MIN_REPEATS", "DEVICE_DEFAULTS", "ProfileSettings", "auto_threads"]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
OVERHEAD_METHODS = ("sliced", "hooks")
MIN_REPEATS = 3  # fewer timed calls than this give no spread to speak of

#: What ``None`` resolves to, per device. ``time_budget_s``: seconds of timed calls for the
#: whole profile, shared by every (model, backend, batch) series (0: fixed ``repeats``).
DEVICE_DEFAULTS = {
    "cuda": dict(batch_sizes=(1, 8, 64, 128), backends=("eager", "graph"), warmup=5, repeats=30,
                 overhead=OVERHEAD_METHODS, time_budget_s=0.0),
    "cpu": dict(batch_sizes=(1, 8), backends=("eager",), warmup=1, repeats=30, overhead=("hooks",),
                time_budget_s=45.0),
}


def auto_threads() -> tuple[int, str]:
    """Intra-op threads for CPU timing and why: all of torch's when the machine is quiet, one when
    the 1-minute load average says other work holds more than half of the cores (spinning OpenMP
    threads then wait for each other and a forward gets many times slower)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cpus > 1 and load > cpus / 2:
        return 1, f"CPU busy (load {load:.1f} on {cpus} cores): timed with 1 thread (--threads N to change)"
    return torch.get_num_threads(), ""


@dataclass(frozen=True)
class ProfileSettings:
    """How to measure. ``None`` fields take the device's default (:data:`DEVICE_DEFAULTS`).

    ``device="auto"``: CUDA when available. ``dtype=None``: fp16 on CUDA, fp32 on the CPU.
    ``repeats``: timed calls per series; with a ``time_budget_s`` it is the most, and each series
    gets as many calls (at least :data:`MIN_REPEATS`) as fit its share of the budget, judged from
    the last warm-up call. Giving ``repeats`` without a budget fixes the count. ``ops``: the op
    backend of :mod:`compressor.ops`. ``overhead``: merge-overhead methods (``sliced``,
    ``hooks``). ``merge_impl``: how merges run (``auto`` = the Triton kernels on CUDA).
    ``threads``: torch intra-op threads on the CPU (None: :func:`auto_threads`)."""

    device: str = "auto"
    batch_sizes: tuple[int, ...] | None = None
    dtype: str | None = None
    backends: tuple[str, ...] | None = None
    warmup: int | None = None
    repeats: int | None = None
    time_budget_s: float | None = None
    ops: str = "auto"
    overhead: tuple[str, ...] | None = None
    seed: int = 0
    eval_batch_size: int = 64
    crop_pct: float | None = None  # eval center-crop fraction; None: each model's recipe (0.875 default)
    eval_workers: int = 4
    merge_impl: str = "auto"
    threads: int | None = None

    def _with_device_defaults(self, device: str) -> "ProfileSettings":
        d = DEVICE_DEFAULTS[device]
        budget = self.time_budget_s
        if budget is None:  # an explicit --repeats means exactly that many calls
            budget = 0.0 if self.repeats is not None else d["time_budget_s"]
        threads = self.threads if self.threads is not None else (auto_threads()[0] if device == "cpu" else torch.get_num_threads())
        return replace(
            self, device=device,
            batch_sizes=tuple(dict.fromkeys(self.batch_sizes if self.batch_sizes is not None else d["batch_sizes"])),
            backends=tuple(dict.fromkeys(self.backends if self.backends is not None else d["backends"])),
            warmup=self.warmup if self.warmup is not None else d["warmup"],
            repeats=self.repeats if self.repeats is not None else d["repeats"],
            overhead=tuple(self.overhead if self.overhead is not None else d["overhead"]),
            time_budget_s=float(budget), threads=threads,
        )

    def resolved(self) -> "ProfileSettings":
        """Validated copy with every ``None`` made concrete for the device."""
        device = resolve_device(self.device, indexed=False, fallback="--device cpu").type
        s = self._with_device_defaults(device)
        dtype = s.dtype or ("fp16" if device == "cuda" else "fp32")
        if dtype not in DTYPES:
            raise RmeetoError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        bad = [b for b in s.backends if b not in EXEC_BACKENDS]
        if bad or not s.backends:
            raise RmeetoError(f"unknown backend {bad[0] if bad else '(none)'!r}: choose from {', '.join(EXEC_BACKENDS)}")
        bad = [m for m in s.overhead if m not in OVERHEAD_METHODS]
        if bad:
            raise RmeetoError(f"unknown merge-overhead method {bad[0]!r}: choose from {', '.join(OVERHEAD_METHODS)}")
        if not s.batch_sizes or min(s.batch_sizes) < 1:
            raise RmeetoError(f"batch sizes must be positive integers, got {list(s.batch_sizes)}")
        if s.repeats < 1 or s.warmup < 0:
            raise RmeetoError(f"repeats must be >= 1 and warmup >= 0, got {s.repeats} / {s.warmup}")
        if s.time_budget_s < 0 or s.threads < 1:
            raise RmeetoError(f"the time budget must be >= 0 and threads >= 1, got {s.time_budget_s} / {s.threads}")
        if s.ops not in ops.BACKENDS:
            raise RmeetoError(f"unknown op backend {s.ops!r}: choose one of {', '.join(ops.BACKENDS)}")
        ops.resolve_backend(s.ops, torch.empty(0, device=device))  # an explicit 'cuda' must be usable
        if s.merge_impl not in MERGE_IMPLS:
            raise RmeetoError(f"unknown merge implementation {s.merge_impl!r}: choose one of {', '.join(MERGE_IMPLS)}")
        if s.merge_impl == "triton" and not (fast_merge.available() and (device == "cuda" or fast_merge.interpreting())):
            raise RmeetoError("the triton merge needs CUDA and Triton: profile with --merge-impl auto or torch")
        return replace(s, dtype=dtype)
