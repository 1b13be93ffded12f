"""ONNX Runtime sessions on the execution providers this machine has: the CPU provider always,
the CUDA provider when ``onnxruntime-gpu`` is installed (``pip install "rmeeto[gpu]"``) and its
CUDA libraries load.

``onnxruntime-gpu`` finds the CUDA and cuDNN libraries of the ``nvidia-*`` pip packages (the ones
PyTorch's CUDA wheels bring) only after ``onnxruntime.preload_dlls()``; :func:`providers` calls
it once. A CUDA session that silently fell back to the CPU is reported as unavailable instead of
being timed as if it ran on the GPU.
"""

from __future__ import annotations

import functools
import os

from ..errors import RmeetoError, first_line

__all__ = ["CPU", "CUDA", "providers", "cuda_available", "install_note", "make_session", "check_chains", "preload_note"]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_PRELOAD: dict[str, str] = {}  # why preload_dlls failed, for the notes of reports


@functools.lru_cache(maxsize=1)
def providers() -> tuple[str, ...]:
    """Execution providers of the installed ONNX Runtime (CUDA libraries preloaded when it has
    the CUDA provider)."""
    import onnxruntime as ort

    found = tuple(ort.get_available_providers())
    if CUDA in found and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001 -- a missing library shows again when the session is made
            _PRELOAD["error"] = f"{type(e).__name__}: {e}"
    return found


def install_note() -> str:
    """Why the CUDA provider is missing although ``onnxruntime-gpu`` is installed, or ''. Both
    packages install the module ``onnxruntime``; the CPU one, installed last, hides the other."""
    if CUDA in providers():
        return ""
    from importlib import metadata

    try:
        metadata.version("onnxruntime-gpu")
    except metadata.PackageNotFoundError:
        return ""
    return ("onnxruntime-gpu is installed but the CPU-only onnxruntime package shadows it: "
            "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")


def cuda_available() -> bool:
    """The installed ONNX Runtime has the CUDA execution provider (``onnxruntime-gpu``)."""
    return CUDA in providers()


def preload_note() -> str:
    """Why ``onnxruntime.preload_dlls()`` failed, or ''."""
    return _PRELOAD.get("error", "")


def check_chains() -> list[list[str]]:
    """Provider chains an exported file is checked with: CUDA first when available, CPU always."""
    chains = [[CPU]]
    if cuda_available():
        chains.insert(0, [CUDA, CPU])
    return chains


def make_session(path, chain: list[str], *, threads: int | None = None, cuda_graph: bool = False):
    """An ``InferenceSession`` on ``chain`` (e.g. ``[CUDA, CPU]``); ``threads``: intra-op threads
    (default: ``OMP_NUM_THREADS`` when set, else ONNX Runtime's own choice); ``cuda_graph``:
    capture the whole graph on the first run (the CUDA provider; inputs and outputs must then
    stay at fixed device addresses, see :func:`compressor.profile.timing`). Raises
    :class:`RmeetoError` when the graph does not load or the first provider was not taken."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    threads = threads if threads is not None else int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads:
        opts.intra_op_num_threads = threads
    spec = [(CUDA, {"enable_cuda_graph": "1"}) if p == CUDA and cuda_graph else p for p in chain]
    try:
        sess = ort.InferenceSession(str(path), opts, providers=spec)
    except Exception as e:  # onnxruntime raises its own pybind exception types (Fail, InvalidGraph, ...)
        raise RmeetoError(f"ONNX Runtime cannot load the exported graph on {chain[0]}: {first_line(e)}") from e
    if sess.get_providers()[0] != chain[0]:
        hint = f" ({preload_note()})" if preload_note() else ""
        raise RmeetoError(f"ONNX Runtime did not start {chain[0]}{hint}: check that the CUDA libraries of onnxruntime-gpu are installed")
    return sess
