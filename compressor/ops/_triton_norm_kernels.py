"""Triton kernels of the fused residual add + RMSNorm (forward and backward).

Plain functions, JIT-compiled (or interpreted) by :mod:`compressor.ops._triton_norm`; no
``from __future__ import annotations`` (see :mod:`compressor.ops._triton_scan_kernels`).
"""

import triton.language as tl


def add_rms_norm_fwd_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, rstd_ptr, rows, D, eps,
                            HAS_RES: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """Grid ``cdiv(rows, BR)``. ``x, res: (rows, D)`` contiguous (``res`` fp32/fp64) →
    ``res_out = res + x`` in the accumulation dtype, ``out = res_out * rstd * w`` in ``out``'s
    dtype, ``rstd: (rows,)`` in the accumulation dtype."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
    c = tl.arange(0, BD)[None, :]
    m = (r < rows) & (c < D)
    off = r.to(tl.int64) * D + c
    acc = tl.load(x_ptr + off, mask=m, other=0.0).to(res_out_ptr.dtype.element_ty)
    if HAS_RES:
        acc += tl.load(res_ptr + off, mask=m, other=0.0).to(res_out_ptr.dtype.element_ty)
    rstd = 1.0 / tl.sqrt(tl.sum(acc * acc, axis=1, keep_dims=True) / D + eps)
    w = tl.load(w_ptr + c, mask=c < D, other=0.0).to(acc.dtype)
    tl.store(res_out_ptr + off, acc, mask=m)
    tl.store(out_ptr + off, (acc * rstd * w).to(out_ptr.dtype.element_ty), mask=m)
    tl.store(rstd_ptr + r, rstd, mask=r < rows)


def add_rms_norm_bwd_kernel(res_ptr, rstd_ptr, w_ptr, dout_ptr, dres_ptr, dx_ptr, dres_in_ptr, dw_ptr, rows, D,
                            HAS_DRES: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """Grid ``cdiv(rows, BR)``. ``res``: the forward's ``res_out``; ``dout, dres``: gradients of
    ``out`` and ``res_out`` → ``dx`` (and ``dres_in``, the same values, for the residual input,
    when its pointer differs) and per-program partial sums ``dw: (grid, D)`` fp32.

    ``xhat = res * rstd``; ``d(res) = dres + rstd * (dout w - xhat * mean(dout w xhat))``."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
    c = tl.arange(0, BD)[None, :]
    m = (r < rows) & (c < D)
    off = r.to(tl.int64) * D + c
    res = tl.load(res_ptr + off, mask=m, other=0.0)
    rstd = tl.load(rstd_ptr + r, mask=r < rows, other=0.0)
    xhat = res * rstd
    w = tl.load(w_ptr + c, mask=c < D, other=0.0).to(res.dtype)
    dout = tl.load(dout_ptr + off, mask=m, other=0.0).to(res.dtype)
    gw = dout * w
    g = rstd * (gw - xhat * (tl.sum(gw * xhat, axis=1, keep_dims=True) / D))
    if HAS_DRES:
        g += tl.load(dres_ptr + off, mask=m, other=0.0).to(res.dtype)
    tl.store(dx_ptr + off, g.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dres_in_ptr + off, g.to(dres_in_ptr.dtype.element_ty), mask=m)
    tl.store(dw_ptr + tl.program_id(0).to(tl.int64) * D + c, tl.sum(dout * xhat, axis=0, keep_dims=True).to(tl.float32),
             mask=c < D)
