"""Device time per GPU kernel of a few calls, from torch.profiler (CUPTI records every kernel of
the process, ONNX Runtime's included). Shared by the benchmarks that break a forward down by
kernel (``triton_mixer_gpu.py --sections kernels``, ``onnx_gpu_kernels.py``,
``profile_merge_kernels.py``)."""

from __future__ import annotations

import torch


def kernel_times(fn, runs: int) -> dict[str, tuple[float, float]]:
    """``runs`` calls of ``fn`` (already warm) → kernel name: (launches per call, device ms per
    call). Empty without CUDA."""
    if not torch.cuda.is_available():
        return {}
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", 0)
        if t > 0 and ev.device_type.name == "CUDA":
            out[ev.key] = (ev.count / runs, t / runs / 1e3)
    return out


def summary(times: dict[str, tuple[float, float]], top: int = 15) -> dict:
    """Total device ms and launches per call, and the ``top`` kernels by device time."""
    ranked = sorted(times.items(), key=lambda kv: -kv[1][1])
    return dict(device_ms=sum(ms for _, ms in times.values()), launches=sum(c for c, _ in times.values()),
                top=[dict(kernel=k[:140], ms=round(ms, 4), calls=c) for k, (c, ms) in ranked[:top]])
