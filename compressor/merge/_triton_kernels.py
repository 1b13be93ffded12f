"""Triton kernels of the fast merge (see :mod:`compressor.merge.fast`, which launches them).

Plain functions: :func:`compressor.merge.fast._kernels` JIT-compiles them for CUDA or wraps them
in Triton's CPU interpreter. This module imports Triton unconditionally (and has no
``from __future__ import annotations``: the interpreter re-reads the ``tl.constexpr``
annotations from the source), so only import it where Triton is present.
"""

import triton.language as tl


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
    j_ok = j < n_dst
    pa = 2 * i  # sources: even patches; destinations: odd patches; positions skip the class token
    pb = 2 * j + 1
    if HAS_CLS:
        pa += (pa >= cls_in).to(tl.int32)
        pb += (pb >= cls_in).to(tl.int32)
    base = metric_ptr + pid_b.to(tl.int64) * stride_b
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
    score = tl.where(ok & (score == score), score, float("-inf"))  # padding and NaN never win
    best = tl.max(score, axis=1)
    best_idx = tl.argmax(score, axis=1, tie_break_left=True).to(tl.int32) + tile_j * BLOCK_J  # ties: lower destination
    out = (pid_b.to(tl.int64) * tl.num_programs(2) + tile_j) * n_src + i
    tl.store(best_ptr + out, best, mask=i_ok)
    tl.store(best_idx_ptr + out, best_idx, mask=i_ok)


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
    removed = (rank < r) & i_ok
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
    row = slot_ptr + pid_b * L
    tl.store(row + p_dst, dst_slot, mask=i < n_dst)
    if HAS_CLS:
        tl.store(row + cls_in, cls_out)
    tl.debug_barrier()  # the destinations' slots are read back below
    if PRUNE:
        gone = tl.zeros([BLOCK_S], dtype=tl.int32) + out_len  # the bin past the end: dropped
    else:
        best_j = tl.zeros([BLOCK_S], dtype=tl.int32)  # from the first tile holding the best score
        found = i < 0
        for t in range(0, n_tiles):
            take = (tl.load(rows + t * n_src + i, mask=i_ok, other=float("-inf")) == v) & ~found
            best_j = tl.where(take, tl.load(best_idx_ptr + (pid_b * n_tiles + t) * n_src + i, mask=i_ok, other=0), best_j)
            found = found | take
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
    tl.store(perm_ptr + pid_b * L + p, order % BLOCK_L, mask=p_ok)
    count = tl.histogram(s, BLOCK_O)
    o = tl.arange(0, BLOCK_O)
    tl.store(offs_ptr + pid_b * (out_len + 1) + o, tl.cumsum(count, axis=0) - count, mask=o <= out_len)


def gather_kernel(hid_ptr, res_ptr, size_ptr, perm_ptr, offs_ptr, hid_out_ptr, res_out_ptr, size_out_ptr,
                   L, out_len, D, h_sb, h_sl, r_sb, r_sl, ho_sb, ho_sl, ro_sb, ro_sl,
                   HAS_SIZE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Output token o of row b: size-weighted mean of its members, and the summed size."""
    pid_b = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1)
    start = tl.load(offs_ptr + pid_b * (out_len + 1) + o)
    end = tl.load(offs_ptr + pid_b * (out_len + 1) + o + 1)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    acc_h = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_s = tl.zeros([1], dtype=tl.float32)
    for k in range(start, end):
        pos = tl.load(perm_ptr + pid_b * L + k).to(tl.int64)
        if HAS_SIZE:
            w = tl.load(size_ptr + pid_b * L + pos + tl.zeros([1], dtype=tl.int64))
        else:
            w = tl.full([1], 1.0, dtype=tl.float32)
        acc_h += tl.load(hid_ptr + pid_b * h_sb + pos * h_sl + dd, mask=d_ok, other=0.0).to(tl.float32) * w
        acc_r += tl.load(res_ptr + pid_b * r_sb + pos * r_sl + dd, mask=d_ok, other=0.0).to(tl.float32) * w
        acc_s += w
    # IEEE division, as the reference's (Triton's ``/`` is a 2-ulp approximation on the GPU)
    tl.store(hid_out_ptr + pid_b * ho_sb + o * ho_sl + dd, tl.div_rn(acc_h, acc_s), mask=d_ok)
    tl.store(res_out_ptr + pid_b * ro_sb + o * ro_sl + dd, tl.div_rn(acc_r, acc_s), mask=d_ok)
    tl.store(size_out_ptr + pid_b * out_len + o + tl.zeros([1], dtype=tl.int64), acc_s)
