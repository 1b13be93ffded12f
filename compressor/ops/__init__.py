"""The hot ops of a Mamba block behind one dispatcher.

Backends:
- ``ref``: sequential pure-PyTorch scan (fp32 accumulation). Forward and backward on any device;
  the backward keeps ``O(b·d·l)`` and recomputes states chunk by chunk (``_scan_lean``).
- ``chunked``: two-level chunked scan (~2√l loop steps, standard ops): few launches on a GPU
  without kernels; the same lean backward.
- ``ssd``: loop-free chunked state-space form (matmuls and element-wise ops, no loop at all);
  exported without control flow (what ONNX Runtime can capture in a CUDA graph).
- ``loop``: the reference recurrence; exported as one ONNX ``Scan`` node over the tokens (the
  default export form: fastest on ONNX Runtime's CPU provider, smallest graph); the mixer's
  backward direction as a ``Scan`` run last token first and an anti-causal conv, without
  flipped copies of the sequence.
- ``cuda``: mamba-ssm / causal-conv1d kernels (and the fused add+RMSNorm Triton kernel).
- ``triton``: rmeeto's own Triton kernels (no compile step; Triton ships with torch on Linux)
  for :func:`bimamba_inner` (the whole bidirectional mixer but ``out_proj``, forward and
  backward) and :func:`add_rms_norm`; the standalone :func:`selective_scan` and
  :func:`causal_conv1d` run ``cuda`` or ``chunked`` under it.
- ``auto``: on CUDA tensors the first present of :data:`AUTO_CUDA_ORDER` (fastest first, as
  measured: docs/benchmarks.md), ``ref`` on CPU (measured fastest there: it moves the fewest
  bytes; benchmarks/bench_cpu_retrain.py); while exporting, the scan form named by
  :data:`EXPORT_SCAN_DEFAULT` (``loop``; the pure-PyTorch scans then use their plain autograd
  forms).

Export forms (:data:`EXPORT_SCANS`, ``rmeeto export --scan``): ``loop``, ``ssd``, ``chunked``
(and ``ref``, unrolled per token: a graph of thousands of nodes). Measured in
docs/benchmarks.md (ONNX Runtime tables).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BackendUnavailable
from . import _kernels, _triton_bimamba
from ._bimamba import Direction, bimamba_inner_ref, bimamba_inner_unflipped
from ._scan_chunked import selective_scan_chunked
from ._scan_onnx import CUSTOM_OPS, REVERSED_OPS, onnx_translation, translating
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
    "bimamba_inner",
    "bimamba_inner_ref",
    "Direction",
    "AUTO_CUDA_ORDER",
]

BACKENDS = ("auto", "ref", "chunked", "ssd", "loop", "cuda", "triton")
#: What ``auto`` picks on CUDA tensors, fastest first; ``triton`` only for the ops it implements.
#: Measured on an H200 (docs/benchmarks.md, section 8): ``triton`` x3.5 (Vim-S) and x3.0 (Vim-Ti)
#: over ``cuda`` at batch 128 fp16, x2.3 for Vim-S at batch 1 in a CUDA graph (1.48 vs 3.43 ms;
#: Vim-Ti 1.52 ms against 2.53 ms for ``cuda`` in an earlier call), x1.5-1.8 for the bf16
#: re-training step. ``chunked`` is ~15x slower than ``cuda`` (section 1, H100).
AUTO_CUDA_ORDER = ("triton", "cuda", "chunked")
_TRITON_OPS = ("bimamba_inner", "rms_norm_fn")
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


def _cuda_kernels(kernel: str) -> tuple[str, ...]:
    return ("selective_scan_fn", "causal_conv1d_fn") if kernel == "bimamba_inner" else (kernel,)


def _present(backend: str, kernel: str) -> bool:
    if backend == "triton":
        return kernel in _TRITON_OPS and _triton_bimamba.available()
    if backend == "cuda":
        return all(_kernels.load(k) is not None for k in _cuda_kernels(kernel))
    return True


def resolve_backend(backend: str, x: torch.Tensor, kernel: str = "bimamba_inner") -> str:
    """Turn ``auto`` into a concrete backend for tensor ``x`` and op ``kernel``; check an
    explicit ``cuda`` or ``triton``."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if _exporting():
        return EXPORT_SCAN_DEFAULT if backend in ("auto", "cuda", "triton") else backend
    if backend == "auto":
        if not x.is_cuda:
            return "ref"
        return next(b for b in AUTO_CUDA_ORDER if _present(b, kernel))
    if backend == "cuda":
        for k in _cuda_kernels(kernel):
            if _kernels.load(k) is None:
                raise BackendUnavailable(f"backend 'cuda' needs {k}, which does not import: {_kernels.INSTALL_HINT}")
        if not x.is_cuda:
            raise BackendUnavailable("backend 'cuda' needs the model and inputs on a CUDA device: move them with .cuda() or choose backend 'chunked'")
    if backend == "triton":
        if not _triton_bimamba.available():
            raise BackendUnavailable("backend 'triton' needs Triton, which does not import: pip install triton (it ships with torch on Linux) or choose backend 'chunked' or 'ref'")
        if not x.is_cuda and not _triton_bimamba.interpreting():
            raise BackendUnavailable("backend 'triton' needs the model and inputs on a CUDA device: move them with .cuda() or choose backend 'ref'")
    return backend


def _standalone(which: str, x: torch.Tensor, kernel: str) -> str:
    """The ``triton`` backend has no standalone scan or conv: those run what ``auto`` picks."""
    return resolve_backend("auto", x, kernel) if which == "triton" else which


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend="auto"):
    """Selective scan. ``u, delta, z: (b, d, l)``, ``A: (d, n)``, ``B, C: (b, n, l)``,
    ``D, delta_bias: (d,)`` → ``(b, d, l)`` in ``u``'s dtype. See :func:`selective_scan_ref`."""
    which = _standalone(resolve_backend(backend, u, "selective_scan_fn"), u, "selective_scan_fn")
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
    if _exporting():  # left padding only: ONNX Runtime folds the Pad into the Conv, no Slice after it
        out = F.conv1d(F.pad(x, (w - 1, 0)), weight.unsqueeze(1), bias, groups=d)
    else:
        out = F.conv1d(x, weight.unsqueeze(1), bias, padding=w - 1, groups=d)[..., : x.shape[-1]]
    return F.silu(out) if activation == "silu" else out


def _anticausal_conv1d_export(x, weight, bias=None, activation=None):
    """``flip(causal_conv1d_ref(flip(x)))`` without the flips, for an ONNX export: output ``t``
    reads tokens ``t .. t + w - 1`` (right zero padding ``w - 1``, the kernel reversed). Same
    shapes as :func:`causal_conv1d_ref`. The reversed kernel is a function of the weights only:
    the export's constant folding turns it into an initializer (no ``Slice`` left in the graph)."""
    d, w = weight.shape
    out = F.conv1d(F.pad(x, (0, w - 1)), weight.flip(-1).unsqueeze(1), bias, groups=d)
    return F.silu(out) if activation == "silu" else out


def causal_conv1d(x, weight, bias=None, activation=None, backend="auto"):
    """Causal depthwise conv1d, dispatched like :func:`selective_scan`; same shapes as the ref."""
    which = _standalone(resolve_backend(backend, x, "causal_conv1d_fn"), x, "causal_conv1d_fn")
    if which == "cuda":
        return _kernels.load("causal_conv1d_fn")(x, weight, bias, activation=activation)
    return causal_conv1d_ref(x, weight, bias, activation)


def add_rms_norm(x, residual, weight, eps, backend="auto"):
    """``residual' = residual + x`` (fp32, fp64 for fp64 inputs; ``x`` alone when ``residual``
    is None) and ``RMSNorm(residual') * weight`` in ``weight``'s dtype (the ``cuda`` kernel
    returns ``x``'s dtype). Dispatched like :func:`selective_scan`. Returns ``(normed, residual')``.

    ``x, residual: (b, l, d)``, ``weight: (d,)``.
    """
    which = resolve_backend(backend, x, "rms_norm_fn")
    if which == "cuda":
        fn = _kernels.load("rms_norm_fn")
        return fn(x, weight, None, residual=residual, eps=eps, prenorm=True, residual_in_fp32=True)
    if which == "triton":
        from ._triton_norm import add_rms_norm_triton

        return add_rms_norm_triton(x, residual, weight, eps)
    acc = torch.promote_types(x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype), torch.float32)
    residual = x.to(acc) if residual is None else residual.to(acc) + x.to(acc)
    normed = residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.to(acc)).to(weight.dtype), residual


def bimamba_inner(h, in_proj_weight, fwd: Direction, bwd: Direction, divide_out: bool = True, backend: str = "auto"):
    """The bidirectional ("bimamba v2") mixer up to ``out_proj``: ``in_proj``, then per
    direction conv + SiLU, ``x_proj``, ``dt_proj`` and the selective scan (the backward direction
    on the reversed sequence), summed (halved when ``divide_out``) and gated with ``silu(z)``.

    ``h: (b, l, d)``, ``in_proj_weight: (2e, d)``, ``fwd, bwd``: :class:`Direction` parameters
    → ``(b, l, e)`` in the activations' dtype. ``ref``, ``chunked``, ``cuda``: the composition
    of :func:`causal_conv1d` and :func:`selective_scan` (:func:`bimamba_inner_ref`); ``triton``:
    fused kernels, channel-last, no flipped copies, their own backward; an ONNX export with the
    ``loop`` scan: :func:`bimamba_inner_unflipped` (no flipped copies in the graph either)."""
    which = resolve_backend(backend, h, "bimamba_inner")
    if which == "triton":
        return _triton_bimamba.bimamba_inner_triton(h, in_proj_weight, fwd, bwd, divide_out)
    if which in REVERSED_OPS and translating() and _exporting():  # the backward direction without flipped copies
        return bimamba_inner_unflipped(h, in_proj_weight, fwd, bwd, divide_out, causal_conv1d_ref, _anticausal_conv1d_export,
                                       CUSTOM_OPS[which], REVERSED_OPS[which])
    return bimamba_inner_ref(h, in_proj_weight, fwd, bwd, divide_out, which)
