"""Triton kernels of the bidirectional selective scan (forward and backward).

Plain functions: :mod:`compressor.ops._triton_bimamba` JIT-compiles them for CUDA or runs them
in Triton's CPU interpreter. This module imports Triton unconditionally and has no
``from __future__ import annotations`` (the interpreter re-reads the ``tl.constexpr``
annotations from the source), so only import it where Triton is present.

Layout: channel-last tensors (``(b, l, channels)``). A program owns ``BD`` channels of one image,
one channel per thread: the thread keeps that channel's ``N`` states in registers as an
``(NA, NB)`` tile (state ``n = a * NB + b``, so that B and C rows arrive as ``NB``-wide vector
loads), and walks the sequence step by step, ``U`` steps unrolled per loop iteration so that
their loads and exponentials are issued ahead of the dependent state updates. The per-step
cost is the same at every length: no tile padding, no power-of-two length.

The two directions are separate programs (``program_id(2)``); the backward one reads token
``l - 1 - s`` at step ``s`` instead of a flipped copy. Everything accumulates in fp32. The unit channel stride ``s_1`` is passed at
run time (not specialised) so that Triton keeps one layout for every tile (channels across lanes
and warps, states within a thread) instead of vectorising channel loads and shuffling.
"""

import triton
import triton.language as tl

# Helpers are JIT functions when compiling; under the interpreter they stay plain Python (the
# kernel's run already patches ``tl``), which spares the interpreter a re-patch per call.
_jit = (lambda fn: fn) if triton.knobs.runtime.interpret else triton.jit

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
OFFSET_BIAS = tl.constexpr(1 << 40)  # = compressor.ops._triton_bimamba.OFFSET_BIAS


@_jit
def _softplus(v):
    """``log1p(exp(v))`` with torch's threshold 20; accurate for very negative ``v``."""
    e = tl.exp(tl.minimum(v, 20.0))
    u = 1.0 + e
    lp = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return tl.where(v > 20.0, v, lp)


@_jit
def _silu(v):
    return v / (1.0 + tl.exp(-v))


@_jit
def _state_index(N: tl.constexpr, NB: tl.constexpr):
    """``(NA, NB, 1)`` state indices ``n = a * NB + b``."""
    return tl.arange(0, N // NB)[:, None, None] * NB + tl.arange(0, NB)[None, :, None]


@_jit
def _step(h, u, dl, bm, cm, a2, dskip):
    """One step: ``h = exp(Δ A) h + Δ u B``, ``p = C.h + D u``."""
    a = tl.exp2(dl[None, None, :] * a2)
    h = a * h + (dl * u)[None, None, :] * bm
    return h, tl.sum(tl.sum(h * cm, axis=0), axis=0) + dskip * u


@_jit
def _fwd_loads(s0, c, L, rev, d_ok, u_base, dt_base, bc_base, z_base, s_ul, s_zl, K: tl.constexpr, N: tl.constexpr,
               U: tl.constexpr):
    """The loads of steps ``s0 + c*U .. s0 + c*U + U - 1`` (masked past ``L``): per step ``(u, Δ, B, C, z)``."""
    ins = ()
    for k in tl.static_range(U):
        s = s0 + c * U + k
        t = s + rev * (L - 1 - 2 * s)  # s, or l - 1 - s backwards
        m = d_ok & (s < L)
        ins = ins + ((tl.load(u_base + t * s_ul, mask=m, other=0.0), tl.load(dt_base + t * s_ul, mask=m, other=0.0),
                      tl.load(bc_base + t * K, mask=s < L, other=0.0), tl.load(bc_base + N + t * K, mask=s < L, other=0.0),
                      tl.load(z_base + t * s_zl, mask=m, other=0.0)),)
    return ins


def scan_fwd_kernel(u_ptr, dt_ptr, bc_ptr, alog_ptr, dskip_ptr, bias_ptr, z_ptr, y_ptr, psum_ptr, hs_ptr, hc_ptr,
                    o_u, o_dt, o_bc, o_alog, o_dskip, o_bias, o_y, o_hs,
                    L, E, n_chunks, CL, s_ub, s_ul, s_zb, s_zl, s_yb, s_yl, s_1, s_an, scale,
                    STORE_PSUM: tl.constexpr, STORE_STATES: tl.constexpr, N: tl.constexpr, NB: tl.constexpr,
                    K: tl.constexpr, R: tl.constexpr, BD: tl.constexpr, U: tl.constexpr, S: tl.constexpr,
                    PF: tl.constexpr = 0, TS: tl.constexpr = 1, MODE: tl.constexpr = 0):
    """Grid ``(b, cdiv(e, BD), 2 * (TS - MODE))``, ``BD // 32`` warps; ``program_id(2) // (TS - MODE)``:
    the direction (1 reads the sequence backwards). Each pointer is the forward direction's tensor;
    ``o_*`` (elements) reach the backward direction's (its own tensor, or the second half of a
    stacked one).

    ``u: (b, l, e)`` conv output; ``dt: (b, l, e)`` Δ before its bias (strides of ``u``);
    ``bc: (b, l, K)`` contiguous x_proj output (``K = R + 2N``; B at column ``R``, C at
    ``R + N``); ``z, y, psum: (b, l, e)`` (``y``, ``psum`` per direction); ``A_log: (e, N)``;
    ``hs: (b, e, cdiv(l, S), N)`` fp32 states entering every ``S``-th step (``S`` a multiple of
    ``U``). ``y = silu(z) * scale * (C.h + D u)`` of this direction (the caller adds the two);
    ``psum``: the same before the gate.

    Each loop iteration first issues the loads of its ``U`` steps, then computes and stores them:
    the compiler may not move a load above an earlier store (the tensors could alias), so this
    order keeps one memory round trip per ``U`` steps instead of one per step. ``PF`` 1: the loads
    of the next ``U`` steps are issued before this iteration's steps are computed (one iteration
    of prefetch, so the round trip overlaps the arithmetic; meant for the latency-bound small
    grids of batch 1).

    Time splits (``TS > 1``, inference only, for grids too small to fill the GPU): each direction's
    sequence is cut into ``TS`` pieces of ``CL`` steps (scan order; ``CL`` a multiple of ``U``,
    ``n_chunks = CL / U`` loop iterations per program). ``MODE`` 1 runs pieces ``0 .. TS - 2`` from
    a zero state and stores into ``hc: (2, b, e, TS - 1, N)`` fp32 their end states, followed by
    ``(2, b, e, TS - 1)`` their sums of Δ (the piece's decay is ``exp(A ΣΔ)``, ``A`` per state).
    ``MODE`` 0 then runs every piece from its true entering state, chained from those
    (``h ← exp(A ΣΔ_j) h + h_j``): two passes of ``l / TS`` steps instead of one of ``l``."""
    # the launcher adds OFFSET_BIAS to the offsets between tensors (a fixed i64 argument type)
    o_dt, o_bc, o_alog = o_dt - OFFSET_BIAS, o_bc - OFFSET_BIAS, o_alog - OFFSET_BIAS
    o_dskip, o_bias = o_dskip - OFFSET_BIAS, o_bias - OFFSET_BIAS
    pid_b = tl.program_id(0)
    rev = tl.program_id(2) // (TS - MODE)
    piece = tl.program_id(2) % (TS - MODE)
    s0 = piece * CL
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = d < E
    n = _state_index(N, NB)
    a2 = -tl.exp(tl.load(alog_ptr + rev * o_alog + d[None, None, :] * s_an + n * s_1, mask=d_ok[None, None, :],
                         other=0.0).to(tl.float32)) * LOG2E
    dskip = tl.load(dskip_ptr + rev * o_dskip + d * s_1, mask=d_ok, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + rev * o_bias + d * s_1, mask=d_ok, other=0.0).to(tl.float32)
    u_base = u_ptr + rev * o_u + pid_b.to(tl.int64) * s_ub + d * s_1
    dt_base = dt_ptr + rev * o_dt + pid_b.to(tl.int64) * s_ub + d * s_1
    z_base = z_ptr + pid_b.to(tl.int64) * s_zb + d * s_1
    y_base = y_ptr + rev * o_y + pid_b.to(tl.int64) * s_yb + d * s_1
    ps_base = psum_ptr + rev * o_y + pid_b.to(tl.int64) * s_yb + d * s_1
    bc_base = bc_ptr + rev * o_bc + (pid_b * L).to(tl.int64) * K + R + n + d[None, None, :] * 0  # NB contiguous
    hs_off = rev * o_hs + (pid_b * E + d[None, None, :]).to(tl.int64) * tl.cdiv(L, S) * N + n
    h = tl.zeros([N // NB, NB, BD], dtype=tl.float32)
    dsum = tl.zeros([BD], dtype=tl.float32)
    if TS > 1:  # pieces of this (image, direction, channels): hc rows j = 0 .. TS - 2
        hc_row = ((rev * tl.num_programs(0) + pid_b) * E + d).to(tl.int64) * (TS - 1)
        sums_at = (2 * tl.num_programs(0) * E).to(tl.int64) * (TS - 1) * N
        if MODE == 0:  # the state entering this piece, chained over the pieces before it
            for j in tl.static_range(TS - 1):
                ds = tl.load(hc_ptr + sums_at + hc_row + j, mask=d_ok & (j < piece), other=0.0)
                he = tl.load(hc_ptr + (hc_row[None, None, :] + j) * N + n, mask=d_ok[None, None, :] & (j < piece),
                             other=0.0)
                h = tl.exp2(ds[None, None, :] * a2) * h + he  # j ≥ piece: decay 1, input 0
    if PF:
        nxt = _fwd_loads(s0, 0, L, rev, d_ok, u_base, dt_base, bc_base, z_base, s_ul, s_zl, K, N, U)
    for c in range(0, n_chunks):
        if STORE_STATES:
            if c % (S // U) == 0:
                tl.store(hs_ptr + hs_off + c // (S // U) * N, h, mask=d_ok[None, None, :])
        if PF:
            ins = nxt
            nxt = _fwd_loads(s0, c + 1, L, rev, d_ok, u_base, dt_base, bc_base, z_base, s_ul, s_zl, K, N, U)
        else:  # all loads of the U steps first
            ins = _fwd_loads(s0, c, L, rev, d_ok, u_base, dt_base, bc_base, z_base, s_ul, s_zl, K, N, U)
        for k in tl.static_range(U):
            s = s0 + c * U + k
            t = s + rev * (L - 1 - 2 * s)
            m = d_ok & (s < L)
            u_, v_, b_, c_, z_ = ins[k]
            u = u_.to(tl.float32)
            dl = tl.where(m, _softplus(v_.to(tl.float32) + bias), 0.0)  # padding: decay 1, input 0
            if MODE == 1:  # end state only (the readout is unused, as in the backward's recompute)
                h, _ = _step(h, u, dl, b_.to(tl.float32), c_.to(tl.float32), a2, dskip)
                dsum += dl
            else:
                h, p = _step(h, u, dl, b_.to(tl.float32), c_.to(tl.float32), a2, dskip)
                p = p * scale
                if STORE_PSUM:
                    tl.store(ps_base + t * s_yl, p.to(psum_ptr.dtype.element_ty), mask=m)
                tl.store(y_base + t * s_yl, (p * _silu(z_.to(tl.float32))).to(y_ptr.dtype.element_ty), mask=m)
    if MODE == 1:
        tl.store(hc_ptr + (hc_row[None, None, :] + piece) * N + n, h, mask=d_ok[None, None, :])
        tl.store(hc_ptr + sums_at + hc_row + piece, dsum, mask=d_ok)


@_jit
def _bwd_segment(u_base, dt_base, bc_base, dbc_base, du_base, ddt_base, dy_base, z_base, scratch, h, a2, bias, dskip,
                 g, a_next, dA, dD, dbias, seg, d_ok, L, s_ul, s_yl, s_zl, scale,
                 REVERSE: tl.constexpr, N: tl.constexpr, NB: tl.constexpr, K: tl.constexpr, S: tl.constexpr,
                 UB: tl.constexpr):
    """Segment ``seg`` (steps ``seg*S .. seg*S + S - 1`` in scan order) of one direction's backward.

    ``h`` is the state the forward saved at the segment's start, ``g`` the gradient of the state
    after the segment's last step coming from later steps, ``a_next`` the decay of the step after
    the segment. Recomputes the segment's states into ``scratch`` (this thread's own slots,
    cache-resident), then walks the steps backwards: ``g_t = C_t dp_t + a_{t+1} g_{t+1}``. Stores
    ``du`` and ``dΔ``, adds ``dB, dC`` summed over this program's channels into ``dbc``; returns
    the carries and the running per-channel sums."""
    n = _state_index(N, NB)
    tl.store(scratch, h)
    # loads of UB steps are issued before their stores (see scan_fwd_kernel): one memory round
    # trip per UB steps in both passes
    for gi in range(0, S // UB):  # recompute: scratch[k] holds the state entering step k
        ins = ()
        for j in tl.static_range(UB):
            s = seg * S + gi * UB + j
            t = s + REVERSE * (L - 1 - 2 * s)
            m = d_ok & (s < L)
            ins = ins + ((tl.load(u_base + t * s_ul, mask=m, other=0.0), tl.load(dt_base + t * s_ul, mask=m, other=0.0),
                          tl.load(bc_base + t * K, mask=s < L, other=0.0), tl.load(bc_base + N + t * K, mask=s < L, other=0.0)),)
        for j in tl.static_range(UB):
            s = seg * S + gi * UB + j
            u_, v_, b_, c_ = ins[j]
            dl = tl.where(d_ok & (s < L), _softplus(v_.to(tl.float32) + bias), 0.0)
            h, _ = _step(h, u_.to(tl.float32), dl, b_.to(tl.float32), c_.to(tl.float32), a2, dskip)
            tl.store(scratch + (gi * UB + j + 1) * N, h)
    for gi in range(0, S // UB):
        ins = ()
        for j in tl.static_range(UB):  # steps k = S-1-gi*UB-j, last to first
            s = seg * S + S - 1 - gi * UB - j
            t = s + REVERSE * (L - 1 - 2 * s)
            m = d_ok & (s < L)
            ins = ins + ((tl.load(u_base + t * s_ul, mask=m, other=0.0), tl.load(dt_base + t * s_ul, mask=m, other=0.0),
                          tl.load(bc_base + t * K, mask=s < L, other=0.0), tl.load(bc_base + N + t * K, mask=s < L, other=0.0),
                          tl.load(dy_base + t * s_yl, mask=m, other=0.0), tl.load(z_base + t * s_zl, mask=m, other=0.0)),)
        for j in tl.static_range(UB):
            k = S - 1 - gi * UB - j
            s = seg * S + k
            ok = s < L
            t = s + REVERSE * (L - 1 - 2 * s)
            m = d_ok & ok
            u_, v_, b_, c_, dy_, z_ = ins[j]
            u = u_.to(tl.float32)
            v = v_.to(tl.float32) + bias
            dl = tl.where(m, _softplus(v), 0.0)
            bm = b_.to(tl.float32)
            cm = c_.to(tl.float32)
            dp = dy_.to(tl.float32) * _silu(z_.to(tl.float32)) * scale
            a = tl.exp2(dl[None, None, :] * a2)
            h_prev = tl.load(scratch + k * N)  # written by this thread: a cache hit
            ah = a * h_prev  # a_t h_{t-1}
            g = cm * dp[None, None, :] + a_next * g
            a_next = a
            gb = tl.sum(tl.sum(g * bm, axis=0), axis=0)
            gah = tl.sum(tl.sum(g * ah * a2, axis=0), axis=0) * LN2  # A = a2 ln 2
            dv = (u * gb + gah) * tl.where(v > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-v)))  # softplus' = sigmoid
            dv = tl.where(m, dv, 0.0)
            tl.store(du_base + t * s_ul, (dl * gb + dskip * dp).to(du_base.dtype.element_ty), mask=m)
            tl.store(ddt_base + t * s_ul, dv.to(ddt_base.dtype.element_ty), mask=m)
            # dB, dC summed over this program's channels, added into the fp32 buffer
            tl.atomic_add(dbc_base + t * (2 * N) + n, tl.sum(g * (dl * u)[None, None, :], axis=2, keep_dims=True),
                          mask=ok, sem="relaxed")
            tl.atomic_add(dbc_base + N + t * (2 * N) + n, tl.sum(h * dp[None, None, :], axis=2, keep_dims=True),
                          mask=ok, sem="relaxed")
            dA += g * ah * dl[None, None, :]
            dD += dp * u
            dbias += dv
            h = h_prev
    return g, a_next, dA, dD, dbias


def scan_bwd_kernel(u_ptr, dt_ptr, bc_ptr, alog_ptr, dskip_ptr, bias_ptr, z_ptr, psum_ptr, hs_ptr, dy_ptr, scratch_ptr,
                    du_ptr, ddt_ptr, dz_ptr, dbc_ptr, dA_ptr, dD_ptr, dbias_ptr,
                    L, E, n_seg, s_ub, s_ul, s_zb, s_zl, s_yb, s_yl, s_dzb, s_dzl, s_1, s_an, s_pdir, scale,
                    REVERSE: tl.constexpr, GATE: tl.constexpr, N: tl.constexpr, NB: tl.constexpr, K: tl.constexpr,
                    R: tl.constexpr, BD: tl.constexpr, S: tl.constexpr, UB: tl.constexpr):
    """Backward of one direction of :func:`scan_fwd_kernel` (``REVERSE``: the backward direction),
    grid ``(b, cdiv(e, BD))``; inputs as the forward's for that direction, with both directions'
    ``psum`` (``s_pdir`` apart) and this direction's ``hs: (b, e, cdiv(l, S), N)`` saved by it, and ``dy: (b, l, e)`` (strides of ``y``);
    ``scratch``: fp32, ``b * cdiv(e, BD) * (S + 1) * N * BD`` elements. Outputs: ``du, ddt:
    (b, l, e)`` (strides of ``u``; ``ddt`` = gradient of Δ before its bias); with ``GATE``
    (one of the two launches) ``dz`` (strides ``s_dzb, s_dzl, 1``); ``dbc: (b, l, 2N)`` fp32,
    zero-initialised (B then C gradients, atomically summed over channel blocks); per-image sums
    ``dA: (b, e, N)`` (for ``A``), ``dD, dbias: (b, e)`` fp32.

    Segments of ``S`` steps are visited last to first; each recomputes its states from the state
    the forward saved at its start, so at most ``S + 1`` states per channel are ever stored."""
    pid_b = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = d < E
    n = _state_index(N, NB)
    dm = d_ok[None, None, :]
    a2 = -tl.exp(tl.load(alog_ptr + d[None, None, :] * s_an + n * s_1, mask=dm, other=0.0).to(tl.float32)) * LOG2E
    dskip = tl.load(dskip_ptr + d * s_1, mask=d_ok, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + d * s_1, mask=d_ok, other=0.0).to(tl.float32)
    row = pid_b.to(tl.int64) * s_ub + d * s_1
    z_base = z_ptr + pid_b.to(tl.int64) * s_zb + d * s_1
    dy_base = dy_ptr + pid_b.to(tl.int64) * s_yb + d * s_1
    bc_base = bc_ptr + (pid_b * L).to(tl.int64) * K + R + n + d[None, None, :] * 0
    dbc_base = dbc_ptr + (pid_b * L).to(tl.int64) * (2 * N)
    hs_off = (pid_b * E + d[None, None, :]).to(tl.int64) * n_seg * N + n
    prog = pid_b * tl.num_programs(1) + tl.program_id(1)
    # this thread's (S + 1) states, its N values contiguous: vector stores and loads
    scratch = scratch_ptr + prog.to(tl.int64) * (S + 1) * N * BD + tl.arange(0, BD)[None, None, :] * ((S + 1) * N) + n
    g = tl.zeros([N // NB, NB, BD], dtype=tl.float32)
    a_next = g + 1.0
    dA = g
    dD = tl.zeros([BD], dtype=tl.float32)
    dbias = dD
    for i in range(0, n_seg):
        seg = n_seg - 1 - i
        if GATE:
            for k in range(0, S):  # gate gradient, once per token: dz = dy * (psum_f + psum_b) * silu'(z)
                t = seg * S + k
                m = d_ok & (t < L)
                zt = tl.load(z_base + t * s_zl, mask=m, other=0.0).to(tl.float32)
                sz = 1.0 / (1.0 + tl.exp(-zt))
                ps = psum_ptr + pid_b.to(tl.int64) * s_yb + d * s_1 + t * s_yl
                dz = tl.load(dy_base + t * s_yl, mask=m, other=0.0).to(tl.float32) * \
                    (tl.load(ps, mask=m, other=0.0).to(tl.float32) + tl.load(ps + s_pdir, mask=m, other=0.0).to(tl.float32))
                tl.store(dz_ptr + pid_b.to(tl.int64) * s_dzb + d * s_1 + t * s_dzl,
                         (dz * sz * (1.0 + zt * (1.0 - sz))).to(dz_ptr.dtype.element_ty), mask=m)
        h0 = tl.load(hs_ptr + hs_off + seg * N, mask=dm, other=0.0)
        g, a_next, dA, dD, dbias = _bwd_segment(
            u_ptr + row, dt_ptr + row, bc_base, dbc_base, du_ptr + row, ddt_ptr + row, dy_base, z_base, scratch, h0,
            a2, bias, dskip, g, a_next, dA, dD, dbias, seg, d_ok, L, s_ul, s_yl, s_zl, scale, REVERSE, N, NB, K, S, UB)
    tl.store(dA_ptr + (pid_b * E + d[None, None, :]).to(tl.int64) * N + n, dA, mask=dm)
    tl.store(dD_ptr + pid_b.to(tl.int64) * E + d, dD, mask=d_ok)
    tl.store(dbias_ptr + pid_b.to(tl.int64) * E + d, dbias, mask=d_ok)
