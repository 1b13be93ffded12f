"""Sequential selective scan in pure PyTorch: the reference every other backend is tested against.

:func:`selective_scan_ref` runs the per-token recurrence through :mod:`._scan_lean` (no autograd
inside, a backward that recomputes states chunk by chunk); :func:`scan_ref_autograd` is the same
formula written out for autograd, the form used while exporting and the oracle of the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prepare_scan_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Shared preamble of every pure-PyTorch scan: upcast, bias + softplus on delta.

    Returns ``(u, delta, A, B, C)`` in the accumulation dtype (fp32, or fp64 for fp64 inputs)
    with ``delta`` already biased and softplus-ed.
    """
    acc = accumulation_dtype(u.dtype)
    u = u.to(acc)
    delta = delta.to(acc)
    if delta_bias is not None:
        delta = delta + delta_bias.to(acc)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)  # threshold 20, as the kernels
    return u, delta, A.to(acc), B.to(acc), C.to(acc)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs; fp64 inputs stay fp64 (never downcast)."""
    return torch.promote_types(dtype, torch.float32)


def finish_scan_output(y, u, D, z, dtype):
    """Shared epilogue: ``y + D*u``, gate with ``silu(z)``, cast back to the input dtype."""
    if D is not None:
        y = y + u * D.to(y.dtype)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype)


def exporting() -> bool:
    """True while ``torch.onnx.export`` / ``torch.export`` trace the model: an autograd.Function
    does not export, so the pure-PyTorch backends then use their plain differentiable forms."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Selective scan, one token at a time, accumulating in fp32 (fp64 for fp64 inputs).

    Shapes: ``u, delta, z: (b, d, l)``, ``A: (d, n)``, ``B, C: (b, n, l)``, ``D, delta_bias: (d,)``.
    Returns ``y: (b, d, l)`` in ``u``'s dtype, where from ``h_0 = 0``
    ``h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t`` and ``y_t = C_t . h_t + D u_t``,
    then ``y_t *= silu(z_t)``. Saves ``O(b·d·l)`` for the backward (see :mod:`._scan_lean`).
    """
    if exporting():
        return scan_ref_autograd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    from ._scan_lean import selective_scan_lean

    return selective_scan_lean(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def scan_ref_autograd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """:func:`selective_scan_ref` written out for autograd (same contract): the form that
    exports, and the tests' oracle for the lean backward. Autograd keeps a ``(b, d, n)`` state
    per token, ``O(b·d·l·n)``: not for training."""
    dtype = u.dtype
    u, delta, A, B, C = prepare_scan_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    b, d, l = u.shape
    dA = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(1))  # (b, d, l, n)
    dBu = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # (b, d, l, n)
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(l):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1)
    return finish_scan_output(y, u, D, z, dtype)
