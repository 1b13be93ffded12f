"""Where a profile was measured: device, CPU, library versions, kernels."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from .. import ops
from .._version import __version__

__all__ = ["hardware_info"]


def hardware_info(device: str) -> dict:
    """Where the numbers were measured."""
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    info = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "gpu_memory_gb": torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else None,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": ort_version,
        "kernels": ops.kernels_available(),
        "rmeeto": __version__,
    }
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
