"""The hot ops of a Mamba block behind one dispatcher.

Backends:
- ``ref``: sequential pure-PyTorch scan (fp32 accumulation). Forward and backward on any device.
- ``chunked``: two-level chunked scan (~2√l loop steps, standard ops): few launches on a GPU
  without kernels.
- ``ssd``: loop-free chunked state-space form (matmuls and element-wise ops, no loop at all);
  exported without control flow (what ONNX Runtime can capture in a CUDA graph).
- ``loop``: the reference recurrence; exported as one ONNX ``Scan`` node over the tokens (the
  default export form: fastest on ONNX Runtime's CPU provider, smallest graph).
- ``cuda``: mamba-ssm / causal-conv1d kernels (and the fused add+RMSNorm Triton kernel).
- ``auto``: ``cuda`` for CUDA tensors when the kernels import, ``chunked`` for other CUDA
  tensors, ``ref`` on CPU (measured fastest there: it moves the fewest bytes); while exporting,
  the scan form named by :data:`EXPORT_SCAN_DEFAULT` (``loop``).

Export forms (:data:`EXPORT_SCANS`, ``rmeeto export --scan``): ``loop``, ``ssd``, ``chunked``
(and ``ref``, unrolled per token: a graph of thousands of nodes). Measured in
docs/benchmarks.md (ONNX Runtime tables).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BackendUnavailable
from . import _kernels
from ._scan_chunked import selective_scan_chunked
from ._scan_onnx import CUSTOM_OPS, onnx_translation, translating
from ._scan_ref import selective_scan_ref
from ._scan_ssd import selective_scan_ssd

__all__ = [
    "BACKENDS",
    "resolve_backend",
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_chunked",
    "selective_scan_ssd",
    "EXPORT_SCANS",
    "EXPORT_SCAN_DEFAULT",
    "onnx_translation",
    "causal_conv1d",
    "causal_conv1d_ref",
    "add_rms_norm",
    "kernels_available",
]

BACKENDS = ("auto", "ref", "chunked", "ssd", "loop", "cuda")
#: scan forms an ONNX export can be written with; the default was measured fastest on ONNX
#: Runtime's CPU provider; ``ssd`` has no control flow (for CUDA graphs on the CUDA provider)
EXPORT_SCANS = ("loop", "ssd", "chunked", "ref")
EXPORT_SCAN_DEFAULT = "loop"
_SCANS = {"ref": selective_scan_ref, "chunked": selective_scan_chunked, "ssd": selective_scan_ssd, "loop": selective_scan_ref}


def kernels_available() -> dict[str, bool]:
    """Which CUDA kernel entry points import here (never raises)."""
    return _kernels.available()


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def resolve_backend(backend: str, x: torch.Tensor, kernel: str = "selective_scan_fn") -> str:
    """Turn ``auto`` into a concrete backend for tensor ``x``; check an explicit ``cuda``."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if _exporting():
        return EXPORT_SCAN_DEFAULT if backend in ("auto", "cuda") else backend
    if backend == "auto":
        if not x.is_cuda:
            return "ref"
        return "cuda" if _kernels.load(kernel) is not None else "chunked"
    if backend == "cuda":
        if _kernels.load(kernel) is None:
            raise BackendUnavailable(f"backend 'cuda' needs {kernel}, which does not import: {_kernels.INSTALL_HINT}")
        if not x.is_cuda:
            raise BackendUnavailable("backend 'cuda' needs the model and inputs on a CUDA device: move them with .cuda() or choose backend 'chunked'")
    return backend


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend="auto"):
    """Selective scan. ``u, delta, z: (b, d, l)``, ``A: (d, n)``, ``B, C: (b, n, l)``,
    ``D, delta_bias: (d,)`` → ``(b, d, l)`` in ``u``'s dtype. See :func:`selective_scan_ref`."""
    which = resolve_backend(backend, u, "selective_scan_fn")
    if which == "cuda":
        fn = _kernels.load("selective_scan_fn")
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if which in CUSTOM_OPS and translating() and _exporting():  # one op in the graph, see _scan_onnx
        return CUSTOM_OPS[which](u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return _SCANS[which](u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def causal_conv1d_ref(x, weight, bias=None, activation=None):
    """Depthwise causal conv. ``x: (b, d, l)``, ``weight: (d, w)``, ``bias: (d,)``;
    left zero padding ``w - 1``; optional ``silu``. Standard ops only (exportable)."""
    d, w = weight.shape
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=w - 1, groups=d)[..., : x.shape[-1]]
    return F.silu(out) if activation == "silu" else out


def causal_conv1d(x, weight, bias=None, activation=None, backend="auto"):
    """Causal depthwise conv1d, dispatched like :func:`selective_scan`; same shapes as the ref."""
    which = resolve_backend(backend, x, "causal_conv1d_fn")
    if which == "cuda":
        return _kernels.load("causal_conv1d_fn")(x, weight, bias, activation=activation)
    return causal_conv1d_ref(x, weight, bias, activation)


def add_rms_norm(x, residual, weight, eps, backend="auto"):
    """``residual' = residual + x`` (fp32, fp64 for fp64 inputs; ``x`` alone when ``residual``
    is None) and ``RMSNorm(residual') * weight`` in ``weight``'s dtype (the ``cuda`` kernel
    returns ``x``'s dtype). Dispatched like :func:`selective_scan`. Returns ``(normed, residual')``.

    ``x, residual: (b, l, d)``, ``weight: (d,)``.
    """
    if resolve_backend(backend, x, "rms_norm_fn") == "cuda":
        fn = _kernels.load("rms_norm_fn")
        return fn(x, weight, None, residual=residual, eps=eps, prenorm=True, residual_in_fp32=True)
    acc = torch.promote_types(x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype), torch.float32)
    residual = x.to(acc) if residual is None else residual.to(acc) + x.to(acc)
    normed = residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.to(acc)).to(weight.dtype), residual
