"""The bidirectional ("bimamba v2") mixer's inner op: both directions' conv, x_proj, dt_proj and
selective scan, combined and gated. One signature, two implementations:

- :func:`bimamba_inner_ref`: the composition of :func:`~compressor.ops.causal_conv1d` and
  :func:`~compressor.ops.selective_scan` that the model has always run (flipped copies for the
  backward direction); under ``ref``, ``chunked`` and ``cuda`` it gives exactly the numbers it
  always gave.
- :func:`bimamba_inner_unflipped`: what an ONNX export with the ``loop`` scan records (export
  only): the backward direction on the sequence as it is, through an anti-causal conv and a
  scan run last token first, so the graph holds no flipped copies; the two directions' sums
  gated once.
- the ``triton`` backend (:mod:`compressor.ops._triton_bimamba`): one conv kernel for both
  directions, one scan kernel for both directions that reads the sequence backwards instead of
  flipping, with the skip, gate and combination fused, and its own backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["Direction", "bimamba_inner_ref", "bimamba_inner_unflipped"]


class Direction(NamedTuple):
    """One scan direction's parameters (as stored by the official models).

    ``conv_weight: (e, w)``, ``conv_bias: (e,)`` or None, ``x_proj_weight: (r + 2n, e)``,
    ``dt_proj_weight: (e, r)``, ``dt_proj_bias: (e,)``, ``A_log: (e, n)``, ``D: (e,)``.
    """

    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    x_proj_weight: torch.Tensor
    dt_proj_weight: torch.Tensor
    dt_proj_bias: torch.Tensor
    A_log: torch.Tensor
    D: torch.Tensor


def _direction(x, z, p: Direction, conv, scan):
    """One direction. ``x, z: (b, e, l)`` (``z`` None: ungated) → ``(b, e, l)``;
    ``conv(x, weight, bias)`` with the SiLU, ``scan(u, delta, A, B, C, D, z, delta_bias)`` with
    the softplus on ``delta``."""
    x = conv(x, p.conv_weight, p.conv_bias)
    x_dbl = F.linear(x.transpose(1, 2), p.x_proj_weight)  # (b, l, r + 2n)
    r, n = p.dt_proj_weight.shape[1], p.A_log.shape[1]
    dt, b_ssm, c_ssm = torch.split(x_dbl, [r, n, n], dim=-1)
    delta = p.dt_proj_weight @ dt.transpose(1, 2)  # (b, e, l) with l contiguous; bias added in the scan
    return scan(x, delta, -torch.exp(p.A_log.float()), b_ssm.transpose(1, 2), c_ssm.transpose(1, 2), p.D.float(), z,
                p.dt_proj_bias.float())


def bimamba_inner_ref(h, in_proj_weight, fwd: Direction, bwd: Direction, divide_out: bool = True, backend: str = "ref"):
    """``h: (b, l, d)``, ``in_proj_weight: (2e, d)`` → ``y: (b, l, e)`` (a transposed view) in
    the activations' dtype: ``xz = in_proj(h)`` split into ``x`` and the gate ``z``, then
    ``y = scan_f(x, z) + flip(scan_b(flip(x), flip(z)))``, halved when ``divide_out``.
    ``backend`` (``ref``, ``chunked`` or ``cuda``) runs the conv and scan ops."""
    from . import causal_conv1d, selective_scan  # the package's dispatchers (defined after this module)

    conv = lambda x, w, b: causal_conv1d(x, w, b, activation="silu", backend=backend)  # noqa: E731
    scan = lambda *args: selective_scan(*args, delta_softplus=True, backend=backend)  # noqa: E731
    # (b, 2e, l) with l contiguous, the layout the scan kernels want (as the official code)
    xz = in_proj_weight @ h.transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    y_f = _direction(x, z, fwd, conv, scan)
    y_b = _direction(x.flip(-1), z.flip(-1), bwd, conv, scan)
    y = y_f + y_b.flip(-1)
    if divide_out:
        y = y / 2
    return y.transpose(1, 2)


def bimamba_inner_unflipped(h, in_proj_weight, fwd: Direction, bwd: Direction, divide_out: bool, conv, conv_reversed,
                            scan, scan_reversed):
    """:func:`bimamba_inner_ref` without flipped copies, for an ONNX export: ``conv_reversed``
    and ``scan_reversed`` run the backward direction on the sequence in token order (an
    anti-causal conv, a scan from the last token to the first), which equals flipping, running
    ``conv``/``scan`` and flipping back; the three flips over ``(b, e, l)`` per block
    (``Slice`` with step -1 in ONNX) are gone. In fp32 and fp64 the gate is applied once to the
    sum: ``(y_f + D_f x_f) g + (y_b + D_b x_b) g = (y_f + D_f x_f + y_b + D_b x_b) g`` with
    ``g = silu(z)`` (the same value up to rounding; one ``Sigmoid`` and two ``Mul`` fewer per
    block). Lower precisions gate each direction inside the scan, in fp32, as the reference.

    Shapes as :func:`bimamba_inner_ref`; ``conv(x, weight, bias, activation)`` and
    ``scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)`` take positional arguments,
    as the custom scan ops do."""
    xz = in_proj_weight @ h.transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    gate_once = h.dtype in (torch.float32, torch.float64)
    ys = [
        _direction(x, None if gate_once else z, p, lambda x, w, b, c=c: c(x, w, b, "silu"), lambda *args, s=s: s(*args, True))
        for p, c, s in ((fwd, conv, scan), (bwd, conv_reversed, scan_reversed))
    ]
    y = ys[0] + ys[1]
    if gate_once:
        y = y * F.silu(z)
    if divide_out:
        y = y / 2
    return y.transpose(1, 2)
