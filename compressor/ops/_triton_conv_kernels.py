"""Triton kernels of the two depthwise convolutions of the bidirectional mixer (+ bias + SiLU).

Plain functions, JIT-compiled (or interpreted) by :mod:`compressor.ops._triton_bimamba`; no
``from __future__ import annotations`` (see :mod:`compressor.ops._triton_scan_kernels`).

Channel-last tensors (``(b, l, e)``, channels contiguous). The forward direction is a causal
conv, ``pre_f[t] = b_f + sum_k w_f[k] x[t - (W-1) + k]``. The official backward direction flips
``x``, runs the same causal conv and flips back; in token order that is an anti-causal conv with
the taps reversed, ``pre_b[t] = b_b + sum_k w_b[k] x[t + (W-1) - k]``, so both come from one read
of ``x`` and no flipped copy is made.
"""

import triton.language as tl


def conv_fwd_kernel(x_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, out_ptr, L, E, s_xb, s_xl, s_odir,
                    HAS_BIAS: tl.constexpr, W: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr):
    """Grid ``(b, cdiv(l, BL), cdiv(e, BD))``. ``x: (b, l, e)`` (strides ``s_xb, s_xl, 1``),
    ``w*: (e, W)``, ``b*: (e,)`` → ``out: (2, b, l, e)`` contiguous: silu(pre_f), silu(pre_b)."""
    pid_b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BL + tl.arange(0, BL)[:, None]
    d = tl.program_id(2) * BD + tl.arange(0, BD)[None, :]
    d_ok = d < E
    x_base = x_ptr + pid_b * s_xb + d
    acc_f = tl.zeros([BL, BD], dtype=tl.float32)
    acc_b = tl.zeros([BL, BD], dtype=tl.float32)
    if HAS_BIAS:
        acc_f += tl.load(bf_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        acc_b += tl.load(bb_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    for k in tl.static_range(W):
        tf = t - (W - 1) + k
        tb = t + (W - 1) - k
        xf = tl.load(x_base + tf * s_xl, mask=d_ok & (tf >= 0) & (tf < L), other=0.0).to(tl.float32)
        xb = tl.load(x_base + tb * s_xl, mask=d_ok & (tb < L), other=0.0).to(tl.float32)
        acc_f += tl.load(wf_ptr + d * W + k, mask=d_ok, other=0.0).to(tl.float32) * xf
        acc_b += tl.load(wb_ptr + d * W + k, mask=d_ok, other=0.0).to(tl.float32) * xb
    m = d_ok & (t < L)
    o = out_ptr + (pid_b * L + t) * E + d
    tl.store(o, (acc_f / (1.0 + tl.exp(-acc_f))).to(out_ptr.dtype.element_ty), mask=m)
    tl.store(o + s_odir, (acc_b / (1.0 + tl.exp(-acc_b))).to(out_ptr.dtype.element_ty), mask=m)


def conv_bwd_kernel(x_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, g_ptr, dx_ptr, dw_ptr, L, E, s_xb, s_xl,
                    s_gdir, s_dxb, s_dxl,
                    HAS_BIAS: tl.constexpr, W: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr):
    """Grid as :func:`conv_fwd_kernel`. ``g: (2, b, l, e)`` contiguous gradients of ``out`` →
    ``dx: (b, l, e)`` (strides ``s_dxb, s_dxl, 1``) and per-program partial sums
    ``dw: (b * cdiv(l, BL), 2, e, W + 1)`` fp32 (taps, then the bias) that the caller sums.

    ``dx[t] = sum_j w_f[W-1-j] dpre_f[t+j] + w_b[W-1-j] dpre_b[t-j]``; the pre-activations at the
    shifted positions are recomputed from ``x`` (cached loads) rather than stored."""
    pid_b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BL + tl.arange(0, BL)[:, None]
    d = tl.program_id(2) * BD + tl.arange(0, BD)[None, :]
    d_ok = d < E
    x_base = x_ptr + pid_b * s_xb + d
    g_base = g_ptr + pid_b * L * E + d
    part = (pid_b * tl.num_programs(1) + tl.program_id(1)) * 2 * E
    dx = tl.zeros([BL, BD], dtype=tl.float32)
    for side in tl.static_range(2):  # 0: forward conv, 1: backward conv
        if side == 0:
            w_ptr = wf_ptr
            b_ptr = bf_ptr
            sign = 1
        else:
            w_ptr = wb_ptr
            b_ptr = bb_ptr
            sign = -1
        bias = tl.zeros([1, BD], dtype=tl.float32)
        if HAS_BIAS:
            bias += tl.load(b_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        for jj in tl.static_range(W):
            tj = t + sign * jj  # dpre at tj reaches x[t] through tap W-1-jj
            pre = tl.zeros([BL, BD], dtype=tl.float32) + bias
            for k in tl.static_range(W):
                tx = tj - sign * (W - 1 - k)
                xk = tl.load(x_base + tx * s_xl, mask=d_ok & (tx >= 0) & (tx < L), other=0.0).to(tl.float32)
                pre += tl.load(w_ptr + d * W + k, mask=d_ok, other=0.0).to(tl.float32) * xk
            mj = d_ok & (tj >= 0) & (tj < L)
            g = tl.load(g_base + side * s_gdir + tj * E, mask=mj, other=0.0).to(tl.float32)
            sg = 1.0 / (1.0 + tl.exp(-pre))
            dpre = g * sg * (1.0 + pre * (1.0 - sg))
            dx += tl.load(w_ptr + d * W + (W - 1 - jj), mask=d_ok, other=0.0).to(tl.float32) * dpre
            if jj == 0:  # weight and bias gradients from the positions this program owns
                dw_base = dw_ptr + (part + side * E + d) * (W + 1)
                for k in tl.static_range(W):
                    tx = t - sign * (W - 1 - k)
                    xk = tl.load(x_base + tx * s_xl, mask=d_ok & (tx >= 0) & (tx < L), other=0.0).to(tl.float32)
                    tl.store(dw_base + k, tl.sum(dpre * xk, axis=0, keep_dims=True), mask=d_ok)
                tl.store(dw_base + W, tl.sum(dpre, axis=0, keep_dims=True), mask=d_ok)
    m = d_ok & (t < L)
    tl.store(dx_ptr + pid_b * s_dxb + t * s_dxl + d, dx.to(dx_ptr.dtype.element_ty), mask=m)
