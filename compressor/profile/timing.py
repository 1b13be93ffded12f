"""Timing one model on one input: how it is run (eager, one CUDA graph, torch.compile, ONNX
Runtime) and how the runs are measured (warm-up, then one timed call after another).

Measurement: ``warmup`` untimed calls, then ``repeats`` calls back to back. On CUDA each call is
bracketed by CUDA events and the host synchronises once at the end, so the per-call times are
the steady-state time per batch (a launch-bound call is timed at its launch rate, a GPU-bound
one at its kernel time). On the CPU each call is timed with ``perf_counter`` (calls are
synchronous there). Throughput is ``batch / median time``, robust to the odd slow call (a host
hiccup in a launch-bound eager loop); ``throughput_sustained`` is ``batch · repeats`` over the
whole span (first start to last end), which such hiccups do lower. The spread of the calls
(quartiles, min, max; :mod:`.stats`) goes beside the median. With a time budget the number of
timed calls is sized to the speed of the warm-up call (CPU defaults).
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import first_line
from .stats import spread

__all__ = ["EXEC_BACKENDS", "Runner", "Unavailable", "prepare_runner", "measure", "time_backend", "close_cache"]

#: How a model is executed (not to be confused with the op backends of :mod:`compressor.ops`).
EXEC_BACKENDS = ("eager", "graph", "compile", "onnxruntime")


class Unavailable(Exception):
    """A backend cannot run here; the message says why (it goes into the report as a note).
    ``status``: ``skipped`` (not available on this machine) or ``failed`` (it was tried)."""

    def __init__(self, message: str, status: str = "skipped"):
        super().__init__(message)
        self.status = status


@dataclass
class Runner:
    """``run()`` does one forward on a static input. ``status`` is ``ok`` or ``fallback`` (the
    backend failed and eager was timed instead); ``device`` is where the work runs."""

    run: Callable[[], Any]
    device: str
    status: str = "ok"
    note: str = ""
    cleanup: Callable[[], None] = field(default=lambda: None)
    host_timed: bool = False  # each run() returns only when the device work is done (ONNX Runtime)


# --------------------------------------------------------------------------------------------
# runners


def _eager(model: nn.Module, x: torch.Tensor) -> Runner:
    return Runner(lambda: model(x), device=x.device.type)


def _graph(model: nn.Module, x: torch.Tensor) -> Runner:
    """The whole forward captured in one CUDA graph with a static input buffer; replay only
    (:class:`compressor.inference.GraphedModel`). Token counts are fixed by the recipe and the
    image size, so the shapes are static."""
    from ..inference import GraphedModel

    if x.device.type != "cuda":
        raise Unavailable("CUDA graphs need a CUDA device")
    graphed = GraphedModel(model, clone_output=False)
    replay = graphed.replayer(x)
    if not graphed.graphed_shapes or graphed.note:
        runner = _eager(model, x)
        runner.status, runner.note = "fallback", f"{graphed.note}; timed eager instead"
        return runner
    return Runner(replay, device="cuda", cleanup=graphed.reset)


def _compile(model: nn.Module, x: torch.Tensor) -> Runner:
    """``torch.compile`` (default mode, static shapes); the first call compiles, outside timing."""
    try:
        compiled = torch.compile(model, dynamic=False)
        compiled(x)
    except Exception as e:  # noqa: BLE001 -- an optional backend: report why it did not run
        torch._dynamo.reset()
        raise Unavailable(f"torch.compile failed ({_short(e)})", "failed") from None
    return Runner(lambda: compiled(x), device=x.device.type, cleanup=torch._dynamo.reset)


def _onnxruntime(model: nn.Module, x: torch.Tensor, cache: dict | None = None) -> Runner:
    """ONNX Runtime on a copy exported once per model (batch dimension dynamic) with
    ``compressor.export.onnx.export_onnx``: the CUDA execution provider for CUDA inputs when
    ``onnxruntime-gpu`` is installed (exported in the model's dtype, fp16 or fp32, with the
    loop-free ``ssd`` scan; input and output stay on the GPU through IO binding), else the CPU
    provider on an fp32 export with the default scan form (no fast fp16 path there). ``cache`` keeps the session for the model's other batch sizes;
    :func:`close_cache`."""
    from ..export import _runtime

    cache = {} if cache is None else cache
    provider = _runtime.CUDA if x.is_cuda and _ort_cuda_available() else _runtime.CPU
    dtype = x.dtype if provider == _runtime.CUDA and x.dtype == torch.float16 else torch.float32
    key = ("onnxruntime", id(model), provider, dtype)
    if key not in cache:
        try:
            cache[key] = _ort_session(model, provider, dtype)
        except Unavailable as e:
            cache[key] = e  # do not export again for the next batch size
    if isinstance(cache[key], Unavailable):
        raise cache[key]
    session = cache[key][1]
    name = f"ONNX Runtime {provider}, {str(dtype).removeprefix('torch.')}"
    if provider == _runtime.CPU:
        feed = {session.get_inputs()[0].name: x.detach().float().cpu().numpy()}
        why = _runtime.install_note() or "onnxruntime-gpu is not installed"
        note = name if not x.is_cuda else f"{name} ({why}: the CPU provider was timed)"
        return Runner(lambda: session.run(None, feed), device="cpu", note=note)
    return Runner(_bound_run(session, x.detach().to(dtype).contiguous()), device="cuda", note=name, host_timed=True)


def _ort_cuda_available() -> bool:
    try:
        from ..export import _runtime

        return _runtime.cuda_available()
    except ImportError:
        return False


def _bound_run(session, x: torch.Tensor) -> Callable[[], Any]:
    """``run()`` on a CUDA session with the input read in place from ``x`` and the output left
    on the GPU (no host copies in the timed call); returns once the GPU work is done."""
    import numpy as np  # onnxruntime's own dependency

    io = session.io_binding()
    np_dtype = np.float16 if x.dtype == torch.float16 else np.float32
    io.bind_input(session.get_inputs()[0].name, "cuda", x.device.index or 0, np_dtype, tuple(x.shape), x.data_ptr())
    io.bind_output(session.get_outputs()[0].name, "cuda", x.device.index or 0)

    def run():
        session.run_with_iobinding(io)
        io.synchronize_outputs()
        return x  # keeps the bound input alive

    return run


def _ort_session(model: nn.Module, provider: str, dtype: torch.dtype):
    try:
        from ..export import _runtime
        from ..export.onnx import export_onnx
    except ImportError as e:
        raise Unavailable(f"compressor.export is not available ({_short(e)})") from None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise Unavailable("onnxruntime is not installed: pip install onnxruntime (or 'rmeeto[gpu]' for the CUDA provider)") from None
    cpu_model = copy.deepcopy(model).float().cpu().eval()  # a ConvertedModel keeps its info through deepcopy
    tmp = tempfile.TemporaryDirectory(prefix="rmeeto-ort-")
    path = Path(tmp.name) / "model.onnx"
    try:
        # the CUDA provider gets the loop-free scan: a Scan node would run token by token from the host
        scan = "ssd" if provider == _runtime.CUDA else None
        export_onnx(cpu_model, path, dynamic_batch=True, check=False, fp16=dtype == torch.float16, scan=scan)
        chain = [provider] if provider == _runtime.CPU else [provider, _runtime.CPU]
        session = _runtime.make_session(path, chain)
    except Exception as e:  # noqa: BLE001 -- optional backend: the reason goes into the report
        tmp.cleanup()
        raise Unavailable(f"ONNX export or session failed ({_short(e)})", "failed") from None
    return tmp, session


def close_cache(cache: dict) -> None:
    """Drop the exported sessions of :func:`_onnxruntime` and their temporary files."""
    for entry in cache.values():
        if isinstance(entry, tuple):
            entry[0].cleanup()
    cache.clear()


_RUNNERS = {"eager": _eager, "graph": _graph, "compile": _compile, "onnxruntime": _onnxruntime}


def prepare_runner(backend: str, model: nn.Module, x: torch.Tensor, cache: dict | None = None) -> Runner:
    """A :class:`Runner` for ``backend``; raises :class:`Unavailable` when it cannot run here.
    ``cache`` keeps per-model state across batch sizes (the exported ONNX session)."""
    if backend not in _RUNNERS:
        raise ValueError(f"unknown execution backend {backend!r}: choose from {', '.join(EXEC_BACKENDS)}")
    if backend == "onnxruntime":
        return _onnxruntime(model, x, cache)
    if backend == "compile" and cache is not None:  # a failed compile fails again at the next batch size
        failed = cache.get(("compile-failed", id(model)))
        if failed is not None:
            raise failed
        try:
            return _compile(model, x)
        except Unavailable as e:
            cache[("compile-failed", id(model))] = e
            raise
    return _RUNNERS[backend](model, x)


# --------------------------------------------------------------------------------------------
# measuring


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(runner: Runner, batch_size: int, *, warmup: int = 5, repeats: int = 30, budget_s: float = 0.0,
            min_repeats: int = 3, on_call: Callable[[int, int], None] | None = None) -> dict:
    """Time ``runner`` (see the module docstring). Peak memory is CUDA's ``max_memory_allocated``
    over the timed calls (weights, inputs, graph pools and activations); None off CUDA.

    ``budget_s > 0``: ``repeats`` is the most; the count is what fits ``budget_s`` at the speed of
    the last warm-up call (or of the first timed call without warm-up), at least ``min_repeats``.
    ``on_call(done, total)`` is called after every call, warm-up included (progress)."""
    repeats = max(1, repeats)
    total = warmup + repeats
    t_call = None
    for i in range(warmup):
        t0 = time.perf_counter()
        runner.run()
        if budget_s > 0 and i == warmup - 1:  # the last warm-up call, finished, sizes the series
            if not runner.host_timed:
                _sync(runner.device)
            t_call = time.perf_counter() - t0
            repeats = _fit(budget_s, t_call, min_repeats, repeats)
            total = warmup + repeats
        if on_call is not None:
            on_call(i + 1, total)
    if not runner.host_timed:
        _sync(runner.device)
    peak = None
    if runner.device == "cuda" and not runner.host_timed:
        torch.cuda.reset_peak_memory_stats()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i, (s, e) in enumerate(zip(starts, ends)):
            s.record()
            runner.run()
            e.record()
            if on_call is not None:
                on_call(warmup + i + 1, total)
        torch.cuda.synchronize()  # sync point: read all events at once
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        total_ms = starts[0].elapsed_time(ends[-1])
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        times = []
        t_first = time.perf_counter()
        while len(times) < repeats:
            t0 = time.perf_counter()
            runner.run()
            times.append((time.perf_counter() - t0) * 1e3)
            if budget_s > 0 and t_call is None:  # no warm-up: judge from the first timed call
                t_call = times[0] / 1e3
                repeats = _fit(budget_s, t_call, min_repeats, repeats)
                total = warmup + repeats
            if on_call is not None:
                on_call(warmup + len(times), total)
        total_ms = (time.perf_counter() - t_first) * 1e3
    st = spread(times)
    return {
        "throughput": batch_size / (st["median"] / 1e3),
        "throughput_sustained": batch_size * repeats / (total_ms / 1e3),
        "latency_ms_median": st["median"],
        "latency_ms_p90": st["p90"],
        "latency_ms_min": st["min"],
        "latency_ms_q1": st["q1"],
        "latency_ms_q3": st["q3"],
        "latency_ms_max": st["max"],
        "peak_memory_mb": peak,
        "warmup": warmup,
        "repeats": repeats,
    }


def _fit(budget_s: float, seconds_per_call: float, lo: int, hi: int) -> int:
    """How many calls of ``seconds_per_call`` fit ``budget_s``, clamped to ``[lo, hi]``."""
    return max(min(lo, hi), min(hi, int(budget_s / max(seconds_per_call, 1e-9))))


def _empty_result(backend: str, batch_size: int, status: str, note: str) -> dict:
    """A timing row without numbers (backend skipped or failed)."""
    return {
        "backend": backend, "batch_size": batch_size, "status": status, "note": note, "device": None,
        "throughput": None, "throughput_sustained": None, "latency_ms_median": None, "latency_ms_p90": None, "latency_ms_min": None,
        "latency_ms_q1": None, "latency_ms_q3": None, "latency_ms_max": None, "peak_memory_mb": None, "warmup": 0, "repeats": 0, "speedup": None,
    }


def time_backend(model: nn.Module, backend: str, x: torch.Tensor, *, warmup: int, repeats: int,
                 cache: dict | None = None, **measure_kw) -> dict:
    """One timing row: prepare the backend, measure, clean up. Never raises for a backend that
    cannot run: the row says ``skipped`` (not available here) or ``failed`` with a note.
    ``measure_kw``: :func:`measure`'s ``budget_s``, ``min_repeats``, ``on_call``."""
    bs = x.shape[0]
    # capture / compile and the timed calls under the same mode (no autograd bookkeeping)
    with torch.inference_mode() if backend != "onnxruntime" else contextlib.nullcontext():
        try:
            runner = prepare_runner(backend, model, x, cache)
        except Unavailable as e:
            return _empty_result(backend, bs, e.status, str(e))
        try:
            stats = measure(runner, bs, warmup=warmup, repeats=repeats, **measure_kw)
        finally:
            runner.cleanup()
            if x.device.type == "cuda":
                torch.cuda.empty_cache()
    return {"backend": backend, "batch_size": bs, "status": runner.status, "note": runner.note,
            "device": runner.device, **stats, "speedup": None}


def _short(e: BaseException) -> str:
    """First line of an exception, capped (the report keeps one line per note)."""
    return first_line(e, with_type=True, limit=200)
