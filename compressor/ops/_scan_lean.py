"""Selective scan with a memory-lean backward: a ``torch.autograd.Function`` in pure PyTorch.

Why: autograd through a per-token loop keeps every ``(b, d, n)`` state for the backward, i.e.
``O(b·d·l·n)`` per scan (Vim-Ti at batch 128: ~0.6 GB per direction and layer, 10 GB for a
depth-8 model), and the backward of each per-token slice allocates a zero tensor the size of
the whole input, ``O(l²·b·d·n)`` work. Here the forward runs without autograd bookkeeping; the
context keeps the inputs (``O(b·d·l)``) and the ``(b, d, n)`` state entering every chunk of
``CHUNK`` tokens (``b·d·n·l/CHUNK`` numbers: with ``CHUNK ≥ n`` no more than one ``(b, d, l)``
tensor). The backward walks the chunks in reverse, recomputes one chunk's states from its
checkpoint and runs the adjoint recurrence ``λ_t = C_t·gy_t + exp(Δ_{t+1}A)·λ_{t+1}`` through it.

Work is tiled (``tiles``): ``CHUNK`` tokens × a slice of the batch, sized so one ``(K, bt, d, n)``
tile stays below ``TILE_ELEMENTS``. On a CPU that keeps the tiles cache-sized and lets the
allocator reuse them (fresh multi-MB allocations are paid in page faults on every call).

Inside a tile the recurrence ``h_t = a_t·h_{t-1} + x_t`` is computed in place, one
``addcmul_`` per token (``sequential``), or with the two-level form of :mod:`._scan_chunked`
(``two_level``: ~2√K steps of bigger ops, for devices where launches cost more than bytes).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._scan_chunked import scan_chunked_autograd
from ._scan_ref import accumulation_dtype, finish_scan_output

__all__ = ["selective_scan_lean", "selective_scan_chunked_lean", "CHUNK", "TILE_ELEMENTS"]

CHUNK = 16  # tokens per chunk; the state checkpoints cost b·d·n·l/CHUNK numbers
# numbers per (K, bt, d, n) tile: 4 MB fp32 on a CPU (2^19..2^21 and CHUNK 8..32 were within
# noise of each other on the 2-core dev box, 2^16..2^17 up to 2x slower: per-op overhead),
# 256 MB elsewhere (few, big launches on a GPU)
TILE_ELEMENTS = {"cpu": 1 << 20, "other": 1 << 26}
SOFTPLUS_THRESHOLD = 20.0  # F.softplus's default, as the CUDA kernels
SEQUENTIAL = ("sequential", None)


def selective_scan_lean(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, chunk=None):
    """The sequential scan (:func:`~compressor.ops.selective_scan_ref`'s contract: ``u, delta,
    z: (b, d, l)``, ``A: (d, n)``, ``B, C: (b, n, l)``, ``D, delta_bias: (d,)`` → ``(b, d, l)``
    in ``u``'s dtype), one in-place update per token; ``chunk`` tokens per chunk (default
    :data:`CHUNK`). Gradients for every tensor input; not twice differentiable."""
    args = (u, delta, A, B, C, D, z, delta_bias)
    opts = (bool(delta_softplus), int(chunk or CHUNK), SEQUENTIAL)
    if _needs_grad(args):
        return _LeanScan.apply(*args, *opts)
    return _forward(*args, *opts, keep_states=False)[0]


def selective_scan_chunked_lean(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                sub_chunk=None):
    """The two-level chunked scan (:func:`~compressor.ops.selective_scan_chunked`'s contract;
    ``sub_chunk`` steps per sub-chunk): the forward is :func:`scan_chunked_autograd` run
    without autograd (the same numbers); the backward recomputes the states of a few batch rows
    at a time over the whole sequence with the same two-level recurrence (~2√l steps)."""
    args = (u, delta, A, B, C, D, z, delta_bias)
    if not _needs_grad(args):
        return scan_chunked_autograd(*args, delta_softplus, chunk=sub_chunk)
    return _LeanScan.apply(*args, bool(delta_softplus), u.shape[-1], ("two_level", sub_chunk))


def _needs_grad(args) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)


class _LeanScan(torch.autograd.Function):
    """Saves the inputs (and, for the sequential form, the state entering each chunk)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, chunk, recurrence):
        if recurrence[0] == "two_level":  # one chunk spans the sequence: no states to keep
            y, states = scan_chunked_autograd(u, delta, A, B, C, D, z, delta_bias, softplus, chunk=recurrence[1]), None
        else:
            y, states = _forward(u, delta, A, B, C, D, z, delta_bias, softplus, chunk, recurrence, keep_states=True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.opts = (softplus, chunk, recurrence)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        grads = _backward(grad, u, delta, A, B, C, D, z, delta_bias, states, *ctx.opts, ctx.needs_input_grad[:8])
        return (*grads, None, None, None)


# --------------------------------------------------------------------------------------------
# shared pieces

LOG2E = 1.4426950408889634  # exp(x) = exp2(x·log2 e): exp2 is ~2x cheaper than exp on a CPU (AVX2)


class _Prepared(NamedTuple):
    """A scan's inputs in the accumulation dtype, laid out for tiles."""

    dl: torch.Tensor  # Δ = softplus(delta + bias), (b, d, l)
    dlu: torch.Tensor  # Δ·u, (b, d, l)
    A: torch.Tensor  # (d, n)
    A2: torch.Tensor  # A·log2 e, (d, n)
    B_t: torch.Tensor  # (l, b, n): token-major (a strided B would slow every tile's product 8x)
    C_t: torch.Tensor  # (l, b, n)


def _prepare(u, delta, A, B, C, delta_bias, softplus):
    """``(pre, uu, prepared)``: the biased raw delta, ``u`` and the tile inputs, in fp32 (fp64
    for fp64 inputs)."""
    acc = accumulation_dtype(u.dtype)
    pre = delta.to(acc)
    if delta_bias is not None:
        pre = pre + delta_bias.to(acc)[None, :, None]
    dl = F.softplus(pre) if softplus else pre
    uu = u.to(acc)
    A = A.to(acc)
    B_t = B.to(acc).permute(2, 0, 1).contiguous()
    C_t = C.to(acc).permute(2, 0, 1).contiguous()
    return pre, uu, _Prepared(dl, dl * uu, A, A * LOG2E, B_t, C_t)


def tiles(b: int, l: int, d: int, n: int, chunk: int, device: torch.device):
    """Batch slices and token chunks: ``(batch_slices, chunk_bounds)``. Batch slices are
    balanced so that ``chunk · bt · d · n ≤ TILE_ELEMENTS`` (at least one row each)."""
    k = max(1, min(chunk, l))
    per_row = k * d * n
    budget = TILE_ELEMENTS["cpu" if device.type == "cpu" else "other"]
    ntiles = max(1, math.ceil(b / max(1, budget // per_row)))
    bt = math.ceil(b / ntiles)
    rows = [(i, min(i + bt, b)) for i in range(0, b, bt)]
    return rows, [(t, min(t + k, l)) for t in range(0, l, k)]


def _tok(t: torch.Tensor, rows, span) -> torch.Tensor:
    """The tile ``rows × span`` of a ``(b, c, l)`` tensor as a token-major ``(K, bt, c)`` view."""
    (b0, b1), (t0, t1) = rows, span
    return t[b0:b1, :, t0:t1].permute(2, 0, 1)


class _Workspace:
    """Flat buffers reused by every tile of one call: ``get(i, K, bt)`` is buffer ``i`` viewed
    as ``(K, bt, d, n)``. Allocating each tile's temporaries afresh costs more than the
    arithmetic on a CPU (measured 1.5 ms of page faults per 6 MB tensor here)."""

    def __init__(self, like: torch.Tensor, count: int, numel: int, d: int, n: int):
        self.bufs = [like.new_empty(numel) for _ in range(count)]
        self.d, self.n = d, n

    def get(self, i: int, K: int, bt: int) -> torch.Tensor:
        return self.bufs[i][: K * bt * self.d * self.n].view(K, bt, self.d, self.n)


def _terms(p: _Prepared, rows, span, a, x):
    """Decays ``a = exp(Δ A)`` and inputs ``x = Δ u B`` of one tile, written into ``a, x:
    (K, bt, d, n)``."""
    (b0, b1), (t0, t1) = rows, span
    torch.exp2(torch.mul(_tok(p.dl, rows, span).unsqueeze(-1), p.A2, out=a), out=a)
    torch.mul(_tok(p.dlu, rows, span).unsqueeze(-1), p.B_t[t0:t1, b0:b1, None, :], out=x)
    return a, x


def _contract(H, C_t, tmp):
    """``y[t, b, d] = Σ_n H[t, b, d, n] · C[t, b, n]`` → ``(K, bt, d)``; ``tmp`` is scratch of
    ``H``'s shape. A product and a matrix-vector sum: twice as fast as a batched matmul here."""
    return _sum_n(H, C_t.unsqueeze(2), tmp)


def _sum_n(M, w, tmp):
    """``Σ_n M[..., n] · w[..., n]`` (``w`` broadcast) → ``M.shape[:-1]``."""
    n = M.shape[-1]
    torch.mul(M, w, out=tmp)
    return torch.mv(tmp.view(-1, n), torch.ones(n, dtype=M.dtype, device=M.device)).view(M.shape[:-1])


def _recur(x, a, h0, recurrence):
    """In place: ``x[t] ← a[t]·x[t-1] + x[t]`` (``x[-1] = h0``, None for zero), so ``x``
    becomes the states ``H``. ``x, a: (K, bt, d, n)``, ``h0: (bt, d, n)``;
    ``recurrence = (kind, sub_chunk)``."""
    if h0 is not None:
        x[0].addcmul_(a[0], h0)
    kind, sub = recurrence
    if kind == "two_level" and x.shape[0] > 2:
        return _recur_two_level(x, a, sub)
    for t in range(1, x.shape[0]):
        x[t].addcmul_(a[t], x[t - 1])
    return x


def _recur_two_level(x, a, T=None):
    """The same recurrence in ~2√K steps: sub-chunks of T scanned side by side from zero, the
    carries chained across sub-chunks, then each state corrected by the product of decays
    since its sub-chunk began (products of values in (0, 1]: nothing overflows)."""
    K = x.shape[0]
    T = min(T or math.isqrt(K - 1) + 1, K)
    nc = -(-K // T)
    pad = nc * T - K  # padding: decay 1, input 0
    if pad:
        x_p = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
        a_p = torch.cat([a, a.new_ones(pad, *a.shape[1:])])
    else:
        x_p, a_p = x, a
    xs = x_p.view(nc, T, *x.shape[1:])
    As = a_p.view(nc, T, *a.shape[1:])
    for t in range(1, T):  # every sub-chunk from a zero state
        xs[:, t].addcmul_(As[:, t], xs[:, t - 1])
    P = torch.cumprod(As, dim=1)  # decay since the sub-chunk began
    for c in range(1, nc):  # state entering sub-chunk c, then the correction of c
        xs[c].addcmul_(P[c], xs[c - 1, T - 1].unsqueeze(0))
    if pad:
        x.copy_(x_p[:K])
    return x


# --------------------------------------------------------------------------------------------
# forward


def _forward(u, delta, A, B, C, D, z, delta_bias, softplus, chunk, recurrence, keep_states):
    """``(out, states)``: the scan's output in ``u``'s dtype and, with ``keep_states``, the
    state entering every chunk ``(nchunks, b, d, n)`` (zeros for the first)."""
    _, uu, p = _prepare(u, delta, A, B, C, delta_bias, softplus)
    b, d, l = u.shape
    n = A.shape[1]
    rows_list, chunks = tiles(b, l, d, n, chunk, u.device)
    ws = _Workspace(uu, 2, _tile_numel(rows_list, chunks, d, n), d, n)
    y = torch.empty_like(uu)
    states = uu.new_zeros(len(chunks), b, d, n) if keep_states else None
    for rows in rows_list:
        h = None
        for c, span in enumerate(chunks):
            K, bt = span[1] - span[0], rows[1] - rows[0]
            if states is not None and h is not None:
                states[c, rows[0] : rows[1]] = h
            a, x = _terms(p, rows, span, ws.get(0, K, bt), ws.get(1, K, bt))
            H = _recur(x, a, h, recurrence)
            h = H[-1].clone()
            _tok(y, rows, span).copy_(_contract(H, p.C_t[span[0] : span[1], rows[0] : rows[1]], a))  # a is free now
    return finish_scan_output(y, uu, D, z, u.dtype), states


def _tile_numel(rows_list, chunks, d, n) -> int:
    return max(r1 - r0 for r0, r1 in rows_list) * max(t1 - t0 for t0, t1 in chunks) * d * n


# --------------------------------------------------------------------------------------------
# backward


class _Grads(NamedTuple):
    ddl: torch.Tensor  # d/dΔ, (b, d, l)
    du: torch.Tensor  # d/du through the scan, (b, d, l)
    dB_t: torch.Tensor  # (l, b, n)
    dC_t: torch.Tensor  # (l, b, n)
    dA: torch.Tensor  # (d, n), accumulated over tiles
    y: torch.Tensor | None  # C·h recomputed for the gate's gradient, (b, d, l)


def _backward(grad, u, delta, A, B, C, D, z, delta_bias, states, softplus, chunk, recurrence, needs):
    """Gradients ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)`` (None where not needed)."""
    pre, uu, p = _prepare(u, delta, A, B, C, delta_bias, softplus)
    g = grad.to(uu.dtype)
    b, d, l = u.shape
    n = A.shape[1]
    gy = g * F.silu(z.to(uu.dtype)) if z is not None else g  # d out / d y = silu(z)
    grads = _Grads(
        ddl=torch.empty_like(uu), du=torch.empty_like(uu), dB_t=torch.empty_like(p.B_t), dC_t=torch.empty_like(p.C_t),
        dA=p.A.new_zeros(d, n), y=torch.empty_like(uu) if z is not None else None,
    )
    rows_list, chunks = tiles(b, l, d, n, chunk, u.device)
    ws = _Workspace(uu, 3, _tile_numel(rows_list, chunks, d, n), d, n)
    for rows in rows_list:
        carry = None  # a_{t1} · λ_{t1}: what the chunk to the right passes back
        for c in range(len(chunks) - 1, -1, -1):
            h0 = states[c, rows[0] : rows[1]] if c > 0 else None
            carry = _backward_tile(p, uu, gy, h0, rows, chunks[c], carry, recurrence, ws, grads)
    return _finish_grads(g, pre, uu, D, z, gy, grads, softplus, needs, (u, delta, A, B, C, D, z, delta_bias))


def _backward_tile(p: _Prepared, uu, gy, h0, rows, span, carry, recurrence, ws: _Workspace, out: _Grads):
    """One tile in reverse: recompute its states from ``h0``, run the adjoint recurrence, write
    the gradients into ``out``. Returns the carry for the tile to the left."""
    (b0, b1), (t0, t1) = rows, span
    K, bt = t1 - t0, b1 - b0
    d, n = p.A.shape
    a, x, G = ws.get(0, K, bt), ws.get(1, K, bt), ws.get(2, K, bt)
    _terms(p, rows, span, a, x)
    H = _recur(x, a, h0, recurrence)  # (K, bt, d, n)
    Cc, Bc = p.C_t[t0:t1, b0:b1], p.B_t[t0:t1, b0:b1]
    gyc, dlc = _tok(gy, rows, span), _tok(p.dl, rows, span)  # (K, bt, d) views
    if out.y is not None:  # C·h, for the gate's gradient
        _tok(out.y, rows, span).copy_(_contract(H, Cc, G))
    out.dC_t[t0:t1, b0:b1] = torch.bmm(gyc.reshape(K * bt, 1, d), H.view(K * bt, d, n)).view(K, bt, n)
    # adjoint of the states: λ_t = gy_t C_t + a_{t+1} λ_{t+1}
    torch.mul(gyc.unsqueeze(-1), Cc.unsqueeze(2), out=G)
    if carry is not None:
        G[-1].add_(carry)
    _recur_reverse(G, a, recurrence)
    carry = a[0] * G[0]
    dlu = _tok(p.dlu, rows, span).reshape(K * bt, 1, d)
    out.dB_t[t0:t1, b0:b1] = torch.bmm(dlu, G.view(K * bt, d, n)).view(K, bt, n)
    # the decay a_t = exp(Δ_t A) multiplies h_{t-1}: M = λ_t · a_t · h_{t-1}, into a's buffer
    M = a.mul_(G)
    M[1:].mul_(H[:-1])
    if h0 is None:
        M[0].zero_()
    else:
        M[0].mul_(h0)
    ddlu = _sum_n(G, Bc.unsqueeze(2), H)  # d/d(Δu), (K, bt, d); H's buffer is scratch from here
    out.dA.add_(torch.mul(M, dlc.unsqueeze(-1), out=H).sum((0, 1)))
    torch.addcmul(_sum_n(M, p.A, H), ddlu, _tok(uu, rows, span), out=_tok(out.ddl, rows, span))
    torch.mul(ddlu, dlc, out=_tok(out.du, rows, span))
    return carry


def _recur_reverse(G, a, recurrence):
    """In place: ``G[t] ← G[t] + a[t+1]·G[t+1]`` from the end (the adjoint recurrence)."""
    K = G.shape[0]
    kind, sub = recurrence
    if kind == "two_level" and K > 2:
        # the same recurrence read backwards: flip, shift the decays by one
        Gf = G.flip(0)
        af = torch.cat([a.new_ones(1, *a.shape[1:]), a[1:].flip(0)])
        G.copy_(_recur_two_level(Gf, af, sub).flip(0))
        return G
    for t in range(K - 2, -1, -1):
        G[t].addcmul_(a[t + 1], G[t + 1])
    return G


def _finish_grads(g, pre, uu, D, z, gy, grads: _Grads, softplus, needs, inputs):
    """The skip term, the gate, bias and softplus; the inputs' dtypes."""
    ddl, du = grads.ddl, grads.du
    D_ = D.to(uu.dtype)[None, :, None] if D is not None else None
    if D_ is not None:
        du = du.addcmul_(gy, D_)
    dD = (gy * uu).sum((0, 2)) if D is not None and needs[5] else None
    dz = None
    if z is not None and needs[6]:
        zz = z.to(uu.dtype)
        sig = torch.sigmoid(zz)
        y = grads.y if D_ is None else grads.y.addcmul_(uu, D_)
        dz = g * y * sig * (1 + zz * (1 - sig))  # silu'(z) = σ(z)(1 + z(1 - σ(z)))
    if softplus:  # F.softplus: the identity above the threshold, sigmoid's slope below
        ddl = ddl.mul_(torch.where(pre > SOFTPLUS_THRESHOLD, torch.ones_like(pre), torch.sigmoid(pre)))
    dbias = ddl.sum((0, 2)) if inputs[7] is not None and needs[7] else None
    out = (du, ddl, grads.dA, grads.dB_t.permute(1, 2, 0), grads.dC_t.permute(1, 2, 0), dD, dz, dbias)
    return tuple(
        None if gr is None or x is None or not need else gr.to(x.dtype).contiguous()
        for gr, x, need in zip(out, inputs, needs)
    )
