"""The ``triton`` backend of :func:`compressor.ops.add_rms_norm`: one kernel forward, one
backward (rather than the eight element-wise passes of the PyTorch form)."""

from __future__ import annotations

import functools

import torch

from ._triton_bimamba import interpreting, triton

__all__ = ["add_rms_norm_triton"]

#: rows per program (the feature dimension is one tile)
ROWS = 4


@functools.lru_cache(maxsize=1)
def _kernels():
    from . import _triton_norm_kernels as k

    return triton.jit(k.add_rms_norm_fwd_kernel), triton.jit(k.add_rms_norm_bwd_kernel)


def _acc_dtype(x, residual):
    dt = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return torch.promote_types(dt, torch.float32)


def _fwd(x, residual, weight, eps):
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    res2 = residual.reshape(-1, d).contiguous() if residual is not None else x2
    rows = x2.shape[0]
    acc = _acc_dtype(x, residual)
    out = torch.empty(rows, d, device=x.device, dtype=weight.dtype)
    res_out = torch.empty(rows, d, device=x.device, dtype=acc)
    rstd = torch.empty(rows, device=x.device, dtype=acc)
    bd = triton.next_power_of_2(d)
    _kernels()[0][(triton.cdiv(rows, ROWS),)](
        x2, res2, weight, out, res_out, rstd, rows, d, eps,
        HAS_RES=residual is not None, BR=ROWS, BD=bd, num_warps=4 if bd <= 1024 else 8,
    )
    return out.view(x.shape), res_out.view(x.shape), rstd


class AddRMSNormFn(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, residual, weight, eps):
        out, res_out, rstd = _fwd(x, residual, weight, eps)
        ctx.save_for_backward(res_out, rstd, weight)
        ctx.x_dtype = x.dtype
        ctx.res_dtype = None if residual is None else residual.dtype
        return out, res_out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout, dres):
        res_out, rstd, weight = ctx.saved_tensors
        d = res_out.shape[-1]
        rows = res_out.numel() // d
        dout2 = dout.reshape(-1, d).contiguous()
        dres2 = dres.reshape(-1, d).contiguous() if dres is not None else dout2
        dx = torch.empty(rows, d, device=res_out.device, dtype=ctx.x_dtype)
        dres_in = torch.empty(rows, d, device=res_out.device, dtype=ctx.res_dtype) if ctx.res_dtype is not None else dx
        grid = triton.cdiv(rows, ROWS)
        dw = torch.empty(grid, d, device=res_out.device, dtype=torch.float32)
        bd = triton.next_power_of_2(d)
        _kernels()[1][(grid,)](
            res_out.reshape(-1, d), rstd, weight, dout2, dres2, dx, dres_in, dw, rows, d,
            HAS_DRES=dres is not None, BR=ROWS, BD=bd, num_warps=4 if bd <= 1024 else 8,
        )
        shape = res_out.shape
        return (dx.view(shape), dres_in.view(shape) if ctx.res_dtype is not None else None,
                dw.sum(0).to(weight.dtype), None)


def add_rms_norm_triton(x, residual, weight, eps):
    """Same contract as the PyTorch form in :func:`compressor.ops.add_rms_norm`:
    ``(normed, residual')`` with ``residual' = residual + x`` in fp32 (fp64 for fp64 inputs) and
    ``normed`` in ``weight``'s dtype. ``x, residual: (..., d)``, ``weight: (d,)``."""
    if x.device.type != "cuda" and not interpreting():
        raise ValueError("the triton backend runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1 set before import)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight)):
        return AddRMSNormFn.apply(x, residual, weight, eps)
    out, res_out, _ = _fwd(x, residual, weight, eps)
    return out, res_out
