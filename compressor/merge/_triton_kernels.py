"""Triton kernels of the fast merge (see :mod:`compressor.merge.fast`, which launches them).

Plain functions: :func:`compressor.merge.fast._kernels` JIT-compiles them for CUDA or wraps them
in Triton's CPU interpreter. This module imports Triton unconditionally (and has no
``from __future__ import annotations``: the interpreter re-reads the ``tl.constexpr``
annotations from the source), so only import it where Triton is present.
"""

import triton
import triton.language as tl

# Helpers are JIT functions when compiling; under the interpreter they stay plain Python.
_jit = (lambda fn: fn) if triton.knobs.runtime.interpret else triton.jit


@_jit
def _scores(base, stride_l, i, j, n_src, n_dst, cls_in, D, HAS_CLS: tl.constexpr, BLOCK_I: tl.constexpr,
            BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
            EPS: tl.constexpr):
    """Cosine scores of sources ``i`` (even patches) against destinations ``j`` (odd patches) of
    one row at ``base``, ``(BLOCK_I, BLOCK_J)`` fp32; padding and NaN scores are -inf."""
    i_ok = i < n_src
    j_ok = j < n_dst
    pa = 2 * i  # sources: even patches; destinations: odd patches; positions skip the class token
    pb = 2 * j + 1
    if HAS_CLS:
        pa += (pa >= cls_in).to(tl.int32)
        pb += (pb >= cls_in).to(tl.int32)
    dd = tl.arange(0, BLOCK_D)
    dot = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    sq_a = tl.zeros([BLOCK_I], dtype=tl.float32)
    sq_b = tl.zeros([BLOCK_J], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + dd) < D
        a = tl.load(base + pa[:, None] * stride_l + (d0 + dd)[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0.0)
        bt = tl.load(base + pb[:, None] * stride_l + (d0 + dd)[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        af = a.to(tl.float32)
        bf = bt.to(tl.float32)
        sq_a += tl.sum(af * af, axis=1)
        sq_b += tl.sum(bf * bf, axis=1)
        if UPCAST:  # the CPU interpreter's dot mishandles bf16
            a = af
            bt = bf
        dot = tl.dot(a, tl.trans(bt), dot, input_precision=PRECISION)  # fp16/bf16 products are exact in fp32
    ok = i_ok[:, None] & j_ok[None, :]
    na = tl.maximum(tl.sqrt_rn(sq_a), EPS)  # a zero token scores 0, not 0/0
    nb = tl.maximum(tl.sqrt_rn(sq_b), EPS)
    score = tl.div_rn(dot, tl.where(ok, na[:, None] * nb[None, :], 1.0))
    return tl.where(ok & (score == score), score, float("-inf"))  # padding and NaN never win


def score_kernel(metric_ptr, best_ptr, best_idx_ptr, stride_b, stride_l, n_src, n_dst, cls_in, D,
                 HAS_CLS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, EPS: tl.constexpr):
    """One (source tile, destination tile) block of the cosine scores, reduced over its
    destinations: best[b, t, i] and best_idx[b, t, i] for destination tile t = program_id(2).
    Splitting the destinations over programs keeps batch-1 latency low (more programs, one pass).

    The score is ``dot / (max(|a|, EPS) * max(|b|, EPS))`` in fp32 with IEEE square root and
    division, NaN counted as -inf: the same operations, in the same order, as the reference
    (``bipartite._cosine``), so that equal inputs give equal scores in both paths."""
    pid_b = tl.program_id(0)
    tile_j = tl.program_id(2)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    j = tile_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok = i < n_src
    score = _scores(metric_ptr + pid_b.to(tl.int64) * stride_b, stride_l, i, j, n_src, n_dst, cls_in, D,
                    HAS_CLS, BLOCK_I, BLOCK_J, BLOCK_D, PRECISION, UPCAST, EPS)
    best = tl.max(score, axis=1)
    best_idx = tl.argmax(score, axis=1, tie_break_left=True).to(tl.int32) + tile_j * BLOCK_J  # ties: lower destination
    out = (pid_b.to(tl.int64) * tl.num_programs(2) + tile_j) * n_src + i
    tl.store(best_ptr + out, best, mask=i_ok)
    tl.store(best_idx_ptr + out, best_idx, mask=i_ok)


@_jit
def _assign(row, perm_row, offs_row, i, removed, best_j, L, n_src, n_dst, cls_in, cls_out, out_len,
            HAS_CLS: tl.constexpr, PRUNE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_O: tl.constexpr):
    """From the removed sources (``removed[i]``, ``best_j[i]`` their destinations) to the slot of
    every position (``row[p]``), the positions sorted by (slot, position) (``perm_row``) and each
    output's first index into them (``offs_row[o]``, ``out_len + 1`` entries). Writes and reads
    back ``row`` within the program."""
    i_ok = i < n_src
    incl = tl.cumsum(removed.to(tl.int32), axis=0)  # removed sources among 0..i
    # kept source i sits at patch 2i, destination i at patch 2i + 1: slot = patch - removed before it
    src_slot = 2 * i - (incl - removed.to(tl.int32))
    dst_slot = 2 * i + 1 - incl
    if HAS_CLS:  # make room for the class token at cls_out (patch slots at or after it move up)
        src_slot += (src_slot >= cls_out).to(tl.int32)
        dst_slot += (dst_slot >= cls_out).to(tl.int32)
    p_src = 2 * i
    p_dst = 2 * i + 1
    if HAS_CLS:
        p_src += (p_src >= cls_in).to(tl.int32)
        p_dst += (p_dst >= cls_in).to(tl.int32)
    tl.store(row + p_dst, dst_slot, mask=i < n_dst)
    if HAS_CLS:
        tl.store(row + cls_in, cls_out)
    tl.debug_barrier()  # the destinations' slots are read back below
    if PRUNE:
        gone = tl.zeros_like(src_slot) + out_len  # the bin past the end: dropped
    else:
        target = 2 * best_j + 1
        if HAS_CLS:
            target += (target >= cls_in).to(tl.int32)
        gone = tl.load(row + target, mask=i_ok, other=0)
    tl.store(row + p_src, tl.where(removed, gone, src_slot), mask=i_ok)
    tl.debug_barrier()
    # inverse map: positions sorted by (slot, position), and each slot's first index
    p = tl.arange(0, BLOCK_L)
    p_ok = p < L
    s = tl.load(row + p, mask=p_ok, other=BLOCK_O - 1)  # padding goes to a bin nobody reads
    order = tl.sort(s * BLOCK_L + p)
    tl.store(perm_row + p, order % BLOCK_L, mask=p_ok)
    count = tl.histogram(s, BLOCK_O)
    o = tl.arange(0, BLOCK_O)
    tl.store(offs_row + o, tl.cumsum(count, axis=0) - count, mask=o <= out_len)


def slot_kernel(best_ptr, best_idx_ptr, slot_ptr, perm_ptr, offs_ptr, L, n_src, n_dst, n_tiles, r, cls_in, cls_out, out_len,
                HAS_CLS: tl.constexpr, PRUNE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_L: tl.constexpr, BLOCK_O: tl.constexpr):
    """slot[b, p] for every position p; perm[b]: positions sorted by slot; offs[b, o]: where
    output o's members start in perm (``offs[o + 1] - offs[o]`` members)."""
    pid_b = tl.program_id(0).to(tl.int64)
    rows = best_ptr + pid_b * n_tiles * n_src  # (n_tiles, n_src): per destination tile
    i = tl.arange(0, BLOCK_S)
    i_ok = i < n_src
    v = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for t in range(0, n_tiles):
        v = tl.maximum(v, tl.load(rows + t * n_src + i, mask=i_ok, other=float("-inf")))
    # rank of each source by descending best score; equal scores: lower index first
    rank = tl.zeros([BLOCK_S], dtype=tl.int32)
    for k0 in range(0, n_src, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        vk = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
        for t in range(0, n_tiles):
            vk = tl.maximum(vk, tl.load(rows + t * n_src + k, mask=k < n_src, other=float("-inf")))
        ahead = (vk[None, :] > v[:, None]) | ((vk[None, :] == v[:, None]) & (k[None, :] < i[:, None]))
        rank += tl.sum((ahead & (k < n_src)[None, :]).to(tl.int32), axis=1)
    best_j = tl.zeros([BLOCK_S], dtype=tl.int32)  # from the first tile holding the best score
    if not PRUNE:
        found = i < 0
        for t in range(0, n_tiles):
            take = (tl.load(rows + t * n_src + i, mask=i_ok, other=float("-inf")) == v) & ~found
            best_j = tl.where(take, tl.load(best_idx_ptr + (pid_b * n_tiles + t) * n_src + i, mask=i_ok, other=0), best_j)
            found = found | take
    _assign(slot_ptr + pid_b * L, perm_ptr + pid_b * L, offs_ptr + pid_b * (out_len + 1), i, (rank < r) & i_ok, best_j,
            L, n_src, n_dst, cls_in, cls_out, out_len, HAS_CLS, PRUNE, BLOCK_L, BLOCK_O)


@_jit
def _gather(hid_ptr, res_ptr, size_ptr, perm_row, offs_row, hid_out_ptr, res_out_ptr, size_out_ptr, o, o_ok,
            pid_b, L, out_len, D, h_sb, h_sl, r_sb, r_sl, ho_sb, ho_sl, ro_sb, ro_sl,
            HAS_SIZE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Output tokens ``o`` (a vector) of row ``pid_b``: the size-weighted mean of their members,
    summed in position order, and the summed sizes; ``BLOCK_D`` channels at a time."""
    start = tl.load(offs_row + o, mask=o_ok, other=0)
    count = tl.load(offs_row + o + 1, mask=o_ok, other=0) - start
    most = tl.max(count, axis=0)
    acc_s = tl.zeros(o.shape, dtype=tl.float32)
    for k in range(0, most):
        m = o_ok & (k < count)
        if HAS_SIZE:
            pos = tl.load(perm_row + start + k, mask=m, other=0).to(tl.int64)
            acc_s += tl.load(size_ptr + pid_b * L + pos, mask=m, other=0.0)
        else:
            acc_s += m.to(tl.float32)
    dd = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + dd) < D
        acc_h = tl.zeros([o.shape[0], BLOCK_D], dtype=tl.float32)
        acc_r = tl.zeros([o.shape[0], BLOCK_D], dtype=tl.float32)
        for k in range(0, most):
            m = o_ok & (k < count)
            pos = tl.load(perm_row + start + k, mask=m, other=0).to(tl.int64)
            if HAS_SIZE:
                w = tl.load(size_ptr + pid_b * L + pos, mask=m, other=0.0)
            else:
                w = m.to(tl.float32)
            m2 = m[:, None] & d_ok[None, :]
            acc_h += tl.load(hid_ptr + pid_b * h_sb + pos[:, None] * h_sl + (d0 + dd)[None, :], mask=m2, other=0.0).to(tl.float32) * w[:, None]
            acc_r += tl.load(res_ptr + pid_b * r_sb + pos[:, None] * r_sl + (d0 + dd)[None, :], mask=m2, other=0.0).to(tl.float32) * w[:, None]
        # IEEE division, as the reference's (Triton's ``/`` is a 2-ulp approximation on the GPU)
        out_m = o_ok[:, None] & d_ok[None, :]
        den = tl.where(o_ok, acc_s, 1.0)[:, None]  # padding lanes: no 0/0
        tl.store(hid_out_ptr + pid_b * ho_sb + o[:, None] * ho_sl + (d0 + dd)[None, :], tl.div_rn(acc_h, den), mask=out_m)
        tl.store(res_out_ptr + pid_b * ro_sb + o[:, None] * ro_sl + (d0 + dd)[None, :], tl.div_rn(acc_r, den), mask=out_m)
    tl.store(size_out_ptr + pid_b * out_len + o, acc_s, mask=o_ok)


def gather_kernel(hid_ptr, res_ptr, size_ptr, perm_ptr, offs_ptr, hid_out_ptr, res_out_ptr, size_out_ptr,
                  L, out_len, D, h_sb, h_sl, r_sb, r_sl, ho_sb, ho_sl, ro_sb, ro_sl,
                  HAS_SIZE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr):
    """Output tokens ``BLOCK_O * program_id(1) + ...`` of row ``program_id(0)``."""
    pid_b = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    _gather(hid_ptr, res_ptr, size_ptr, perm_ptr + pid_b * L, offs_ptr + pid_b * (out_len + 1), hid_out_ptr, res_out_ptr,
            size_out_ptr, o, o < out_len, pid_b, L, out_len, D, h_sb, h_sl, r_sb, r_sl, ho_sb, ho_sl, ro_sb, ro_sl,
            HAS_SIZE, BLOCK_D)


def merge_small_kernel(hid_ptr, res_ptr, size_ptr, slot_ptr, perm_ptr, offs_ptr, hid_out_ptr, res_out_ptr, size_out_ptr,
                       L, n_src, n_dst, r, cls_in, cls_out, out_len, D, h_sb, h_sl, r_sb, r_sl, ho_sb, ho_sl, ro_sb, ro_sl,
                       HAS_CLS: tl.constexpr, PRUNE: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK_S: tl.constexpr,
                       BLOCK_SD: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, EPS: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """The whole merge in one launch, for short rows at small batch (grid ``b × output blocks``):
    every program scores all sources against all destinations of its row (one ``BLOCK_S`` tile),
    ranks them and builds the slot map (its own copy, in its own scratch row of ``slot``,
    ``perm`` and ``offs``: ``(b, programs, ...)``), then writes its ``BLOCK_G`` output tokens. The
    repeated scoring costs idle SMs nothing at batch 1 and saves two launches; the arithmetic
    is the three kernels', so both paths decide alike."""
    pid_b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    scratch = pid_b * tl.num_programs(1) + g
    i = tl.arange(0, BLOCK_S)
    i_ok = i < n_src
    score = _scores(hid_ptr + pid_b * h_sb, h_sl, i, i, n_src, n_dst, cls_in, D, HAS_CLS, BLOCK_S, BLOCK_S, BLOCK_SD,
                    PRECISION, UPCAST, EPS)
    v = tl.max(score, axis=1)
    best_j = tl.argmax(score, axis=1, tie_break_left=True).to(tl.int32)  # ties: lower destination
    v_k = tl.where(i_ok, v, float("-inf"))
    ahead = (v_k[None, :] > v[:, None]) | ((v_k[None, :] == v[:, None]) & (i[None, :] < i[:, None]))
    rank = tl.sum((ahead & i_ok[None, :]).to(tl.int32), axis=1)  # descending best score, lower index first
    perm_row = perm_ptr + scratch * L
    offs_row = offs_ptr + scratch * (out_len + 1)
    _assign(slot_ptr + scratch * L, perm_row, offs_row, i, (rank < r) & i_ok, best_j, L, n_src, n_dst, cls_in, cls_out,
            out_len, HAS_CLS, PRUNE, BLOCK_L, BLOCK_O)
    tl.debug_barrier()  # perm and offs are read back by other threads of the program
    o = g * BLOCK_G + tl.arange(0, BLOCK_G)
    _gather(hid_ptr, res_ptr, size_ptr, perm_row, offs_row, hid_out_ptr, res_out_ptr, size_out_ptr, o, o < out_len,
            pid_b, L, out_len, D, h_sb, h_sl, r_sb, r_sl, ho_sb, ho_sl, ro_sb, ro_sl, HAS_SIZE, BLOCK_D)
