"""The bidirectional ("bimamba v2") mixer's inner op: both directions' conv, x_proj, dt_proj and
selective scan, combined and gated. One signature, two implementations:

- :func:`bimamba_inner_ref`: the composition of :func:`~compressor.ops.causal_conv1d` and
  :func:`~compressor.ops.selective_scan` that the model has always run (flipped copies for the
  backward direction); under ``ref``, ``chunked`` and ``cuda`` it gives exactly the numbers it
  always gave.
- the ``triton`` backend (:mod:`compressor.ops._triton_bimamba`): one conv kernel for both
  directions, one scan kernel for both directions that reads the sequence backwards instead of
  flipping, with the skip, gate and combination fused, and its own backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["Direction", "bimamba_inner_ref"]


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


def _direction_ref(x, z, p: Direction, backend: str, conv, scan):
    """One direction. ``x, z: (b, e, l)`` → ``(b, e, l)``."""
    x = conv(x, p.conv_weight, p.conv_bias, activation="silu", backend=backend)
    x_dbl = F.linear(x.transpose(1, 2), p.x_proj_weight)  # (b, l, r + 2n)
    r, n = p.dt_proj_weight.shape[1], p.A_log.shape[1]
    dt, b_ssm, c_ssm = torch.split(x_dbl, [r, n, n], dim=-1)
    delta = p.dt_proj_weight @ dt.transpose(1, 2)  # (b, e, l) with l contiguous; bias added in the scan
    return scan(
        x, delta, -torch.exp(p.A_log.float()), b_ssm.transpose(1, 2), c_ssm.transpose(1, 2),
        p.D.float(), z, delta_bias=p.dt_proj_bias.float(), delta_softplus=True, backend=backend,
    )


def bimamba_inner_ref(h, in_proj_weight, fwd: Direction, bwd: Direction, divide_out: bool = True, backend: str = "ref"):
    """``h: (b, l, d)``, ``in_proj_weight: (2e, d)`` → ``y: (b, l, e)`` (a transposed view) in
    the activations' dtype: ``xz = in_proj(h)`` split into ``x`` and the gate ``z``, then
    ``y = scan_f(x, z) + flip(scan_b(flip(x), flip(z)))``, halved when ``divide_out``.
    ``backend`` (``ref``, ``chunked`` or ``cuda``) runs the conv and scan ops."""
    from . import causal_conv1d, selective_scan  # the package's dispatchers (defined after this module)

    # (b, 2e, l) with l contiguous, the layout the scan kernels want (as the official code)
    xz = in_proj_weight @ h.transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    y_f = _direction_ref(x, z, fwd, backend, causal_conv1d, selective_scan)
    y_b = _direction_ref(x.flip(-1), z.flip(-1), bwd, backend, causal_conv1d, selective_scan)
    y = y_f + y_b.flip(-1)
    if divide_out:
        y = y / 2
    return y.transpose(1, 2)
