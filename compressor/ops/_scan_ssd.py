"""Selective scan without any loop: chunks of ``T`` steps computed with matmuls and element-wise
ops only (a chunked state-space form, after Mamba-2's SSD, adapted to Mamba-1's per-channel,
per-state decay). This is the ONNX form for GPUs (``rmeeto export --scan ssd``): a few dozen standard ops per direction,
no ``Loop``/``Scan``/``If``, so ONNX Runtime runs it as plain kernels (and can capture it in a
CUDA graph).

Within a chunk, with per-step log-decays ``P_k = max(Δ_k·A, -K)`` (clamped, see below) and
their chunk-local cumulative sums ``S_t`` taken relative to a reference step ``m`` (the middle),
the state is ``h_t = e^{S_t} ⊙ (c + Σ_{s≤t} e^{-S_s} ⊙ Δ_s u_s B_s)`` where ``c`` is the state
entering the chunk carried to the reference. So one ``exp``, one division, one matmul with a
``(T, T)`` triangle of ones (the cumulative sum) and the contraction with ``C`` give all states
at once. The chunks are chained by a linear recurrence on their end states (``log2(nc)``
Hillis-Steele steps on small tensors).

Why clamp: ``e^{S}`` and ``e^{-S}`` overflow float32 when a chunk decays by more than about
88 nats. Clamping every step's decay at ``e^{-K}`` bounds ``|S| ≤ K·T/2``; a step that decays by
more than ``e^{-K}`` already wipes the state to within ``e^{-K}`` of zero, so the clamp changes
the result by less than ``e^{-K}`` relative to the state (``K = 16``: 1e-7, float32's own
rounding; float64 uses ``K = 64``). Nothing is assumed about Δ or A: any input stays finite.

Cost: about eleven element-wise passes over ``(b, d, n, L)`` tensors per direction (the
sequential reference makes ``L`` small steps instead): fast on a GPU and in ONNX Runtime, where
every op is one kernel over the whole tensor; on a CPU in eager PyTorch the reference is faster.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ._scan_ref import finish_scan_output, prepare_scan_inputs

__all__ = ["selective_scan_ssd", "ssd_params", "upper_ones", "relative_cumsum_matrix"]

#: per accumulation dtype: (chunk length T, per-step log-decay clamp K); |exponents| ≤ K·T/2
_PARAMS = {torch.float32: (8, 16.0), torch.float64: (16, 64.0)}


def ssd_params(dtype: torch.dtype) -> tuple[int, float]:
    """``(T, K)``: chunk length and per-step decay clamp for accumulation dtype ``dtype``."""
    return _PARAMS[dtype]


def selective_scan_ssd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Same contract as :func:`selective_scan_ref`: ``u, delta, z: (b, d, l)``, ``A: (d, n)``,
    ``B, C: (b, n, l)``, ``D, delta_bias: (d,)`` → ``(b, d, l)`` in ``u``'s dtype."""
    dtype = u.dtype
    u, delta, A, B, C = prepare_scan_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    T, K = ssd_params(u.dtype)
    b, d, l = u.shape
    n = A.shape[1]
    nc = -(-l // T)
    pad = nc * T - l  # padded steps: Δ = 0 (decay 1), input 0, C 0: they change nothing
    dl, x, Bp, Cp = (F.pad(t, (0, pad)) for t in (delta, delta * u, B, C))
    # layout (b, d, n, nc, T): L innermost, so every broadcast runs over long contiguous spans
    logd = (dl.view(b, d, 1, nc, T) * A.view(1, d, n, 1, 1)).clamp(min=-K)  # per-step log-decay
    S = logd @ _const(relative_cumsum_matrix(T, np.float32), u)  # Σ_{k≤t} P_k − Σ_{k≤m} P_k
    E = S.exp()  # decay from the reference step to t (≤ e^{K·T/2})
    W = (x.view(b, d, 1, nc, T) * Bp.view(b, 1, n, nc, T)) / E
    to_ref = logd[..., 0] - S[..., 0]  # Σ_{k≤m} P_k: chunk start → reference, (b, d, n, nc)
    h_in = _chunk_carries((to_ref + S[..., -1]).exp(), E[..., -1] * W.sum(-1))
    c = (to_ref.exp() * h_in).reshape(-1, 1)  # state entering each chunk, at the reference
    G = torch.addmm(c, W.reshape(-1, T), _const(upper_ones(T, np.float32), u))  # c + cumulative sums (one Gemm)
    y = (E * G.view(b, d, n, nc, T) * Cp.view(b, 1, n, nc, T)).sum(2)
    return finish_scan_output(y.reshape(b, d, nc * T)[..., :l], u, D, z, dtype)


@functools.lru_cache(maxsize=None)
def upper_ones(T: int, dtype=np.float32) -> np.ndarray:
    """``(T, T)`` with ones where row ≤ column: ``x @ U`` is the inclusive cumulative sum."""
    return np.triu(np.ones((T, T), dtype=dtype))


@functools.lru_cache(maxsize=None)
def relative_cumsum_matrix(T: int, dtype=np.float32) -> np.ndarray:
    """``(T, T)`` matrix ``M`` with ``(x @ M)_t = Σ_{k≤t} x_k − Σ_{k≤m} x_k``, ``m = (T-1)//2``."""
    m = (T - 1) // 2
    U = upper_ones(T, dtype)
    return U - U[:, m : m + 1]


def _const(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A small constant matrix on ``like``'s device and dtype (exact: entries are 0 and ±1)."""
    return torch.as_tensor(a).to(device=like.device, dtype=like.dtype)


def _chunk_carries(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """State entering each chunk: ``h_0 = 0``, ``h_{c+1} = a_c ⊙ h_c + e_c`` along the last dim
    (``a, e: (..., nc)``). Hillis-Steele: ``⌈log2 nc⌉`` steps of whole-tensor ops, each folding
    in the partial sum ``k`` chunks back (only products of decays ≤ 1 are formed)."""
    nc = a.shape[-1]
    k = 1
    while k < nc:
        e = e + a * _shift(e, k, 0.0)
        if 2 * k < nc:  # the last step does not need the combined decays
            a = a * _shift(a, k, 1.0)
        k *= 2
    return _shift(e, 1, 0.0)  # the end state of chunk c enters chunk c + 1


def _shift(x: torch.Tensor, k: int, fill: float) -> torch.Tensor:
    """``x`` moved ``k`` places along the last dim, ``fill`` entering at the front."""
    return F.pad(x[..., : x.shape[-1] - k], (k, 0), value=fill)
