"""R-MeeTo's bipartite soft matching and the reference merge, as pure functions (after ToMe's
``tome/merge.py``).

:func:`match` looks at a metric once and returns a closure ``merge(x)`` that *sums* the tokens
of any ``(b, L, c)`` tensor into their output slots with the same assignment; size-weighted
averaging is ``merge(x * size) / merge(size)`` (:func:`merge_wavg`). The class token is taken
out before matching and comes back at ``cls_out``; that re-insertion is folded into the same
slot map, so one ``scatter_add`` moves every token (hidden states, residual, sizes, sources).
Two class tokens (``cls_in``/``cls_out`` tuples of two ascending positions) are handled the same
way: both are taken out, neither is a source, a destination or part of the scores.
:func:`merge_ref` is the whole merge node (hidden, residual, sizes) in that form: the pure-PyTorch
twin of :func:`compressor.merge.fast.fast_merge`, with the same signature.

Numerics, shared bit for bit with the Triton kernels (``_triton_kernels.py``):

- cosine scores are ``dot(a, b) / (max(|a|, eps) * max(|b|, eps))`` with dot products, squared
  norms and the division in fp32 whatever the input dtype (fp16/bf16 products are exact in fp32),
  never under autocast; a zero token scores 0 against everything (no 0/0), a NaN score counts
  as ``-inf`` (a NaN token is never chosen as the best match and ranks last);
- ties: a source's best destination is the lowest-index one among equal scores, and sources with
  equal best scores are ranked lower index first (a stable sort).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["NORM_EPS", "apply_slots", "match", "merge_ref", "merge_source", "merge_wavg", "patch_slots", "slot_map"]

Merge = Callable[[torch.Tensor], torch.Tensor]

#: Norms below this are clamped to it in the cosine (as ``F.normalize``): a zero token scores 0.
NORM_EPS = 1e-12


def _norm(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` over the last dim, fp32, correctly rounded (as the kernel's ``sqrt_rn``): the CPU's
    vectorised fp32 ``sqrt`` is not (it was 1 ulp off for 17% of the integers below 1e5 here), so
    the root is taken in fp64, one value per token, and rounded once."""
    sq = (x * x).sum(-1)
    return (sq.double().sqrt().float() if sq.device.type != "mps" else sq.sqrt()).clamp_min(NORM_EPS)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a: (b, n, c)``, ``b: (b, m, c)`` fp32 → ``(b, n, m)`` cosine, norms clamped at NORM_EPS.
    The dot product comes first and the division last, as in the kernel, so that the two agree
    to the last bit whenever the dot products and squared norms do (e.g. on integer tokens)."""
    dot = a @ b.transpose(1, 2)
    return dot / (_norm(a).unsqueeze(2) * _norm(b).unsqueeze(1))


def _scores(metric: torch.Tensor, distance: str) -> torch.Tensor:
    """Similarity of every source (even position) to every destination (odd position), fp32.

    Autocast would run the matmul in fp16/bf16 and round the scores to 8-11 bits, turning
    near-equal candidates into ties (the kernel path never autocasts): it is switched off here,
    only when it is on, so that export traces see no autocast region. Cost: one fp32 matmul of
    ``(n/2)² · c`` per merge, negligible beside the blocks.
    """
    if torch.is_autocast_enabled(metric.device.type):
        with torch.autocast(metric.device.type, enabled=False):
            return _scores(metric, distance)
    metric = metric.float()
    a, b = metric[:, 0::2], metric[:, 1::2]
    if distance == "cosine":
        s = _cosine(a, b)
    else:
        norm = metric.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        metric = metric / norm
        s = -torch.cdist(metric[:, 0::2], metric[:, 1::2], p=1.0 if distance == "l1" else 2.0)
    return s.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def _stable_order(v: torch.Tensor) -> torch.Tensor:
    """``v: (b, n)`` → indices sorting each row by descending value, lower index first among equals
    (a stable descending sort), computed as the kernel does: rank ``i`` = how many entries are
    ahead of it, then the inverse permutation. No sort op: ``aten.sort.stable`` has no ONNX
    lowering, and the ``(b, n, n)`` comparisons cost less than the ``(b, n, n)`` scores."""
    n = v.shape[-1]
    before = torch.ones(n, n, dtype=torch.bool, device=v.device).tril(-1)  # [i, k]: k < i
    vi, vk = v.unsqueeze(2), v.unsqueeze(1)
    rank = ((vk > vi) | ((vk == vi) & before)).sum(-1)  # (b, n): a permutation of 0..n-1
    return torch.empty_like(rank).scatter_(1, rank, torch.arange(n, device=v.device).expand_as(rank))


def _positions(cls) -> tuple[int, ...]:
    """``None`` → ``()``, an index → ``(i,)``, a tuple of ascending indices as it is."""
    if cls is None:
        return ()
    return tuple(cls) if isinstance(cls, (tuple, list)) else (cls,)


def _drop_cls(x: torch.Tensor, cls_in) -> torch.Tensor:
    """``x: (b, L, ...)`` without the class tokens at ``cls_in`` (the last one first, so that the
    earlier indices still hold)."""
    for p in reversed(_positions(cls_in)):
        x = torch.cat([x[:, :p], x[:, p + 1 :]], dim=1)
    return x


def patch_slots(metric, r, *, ordered=True, prune=False, distance="cosine"):
    """Output slot of each patch token (class token excluded) after removing ``r`` of them.

    ``metric: (b, n, c)`` → ``slot: (b, n)`` long with values in ``[0, n - r)``; a pruned token
    gets slot ``n - r`` (a bin that is cut off). Sources are the even positions, destinations
    the odd ones; the ``r`` sources whose best cosine (or ``-cdist``) to a destination is highest
    go into that destination (ties: lower indices first, see the module docstring). ``ordered``:
    kept tokens keep their relative order (the paper); else ToMe's order ``[unmerged sources by
    descending score, destinations]``.
    """
    b, n, _ = metric.shape
    n_src, n_dst = (n + 1) // 2, n // 2
    node_max, node_idx = _scores(metric, distance).max(dim=-1)  # (b, n_src); first index among equals
    edge_idx = _stable_order(node_max)
    src_idx, unm_idx = edge_idx[:, :r], edge_idx[:, r:]
    dev = metric.device
    if ordered:
        removed = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter_(1, 2 * src_idx, True)
        rank = (~removed).long().cumsum(1) - 1  # output index of every kept token
        dst_slot = rank[:, 1::2]  # (b, n_dst)
        src_slot = rank[:, 0::2].scatter(1, src_idx, dst_slot.gather(1, node_idx.gather(1, src_idx)))
    else:
        unm_slot = torch.arange(n_src - r, device=dev).expand(b, -1)
        dst_slot = (n_src - r + torch.arange(n_dst, device=dev)).expand(b, -1)
        src_slot = torch.empty(b, n_src, dtype=torch.long, device=dev)
        src_slot.scatter_(1, unm_idx, unm_slot)
        src_slot.scatter_(1, src_idx, dst_slot.gather(1, node_idx.gather(1, src_idx)))
    if prune:
        src_slot = src_slot.scatter(1, src_idx, torch.full_like(src_idx, n - r))
    slot = torch.empty(b, n, dtype=torch.long, device=dev)
    slot[:, 0::2] = src_slot
    slot[:, 1::2] = dst_slot
    return slot


def slot_map(metric, r, cls_in=None, cls_out=None, *, ordered=True, prune=False, distance="cosine") -> torch.Tensor:
    """Output slot of every token of ``metric: (b, L, c)`` (class token at ``cls_in``, or None;
    two class tokens: tuples of two ascending positions) when ``r`` are removed: ``(b, L)`` long
    in ``[0, L - r)``, each class token alone at its ``cls_out``; with ``prune`` the dropped
    sources get slot ``L - r`` (an extra bin)."""
    b = metric.shape[0]
    slot = patch_slots(_drop_cls(metric, cls_in), r, ordered=ordered, prune=prune, distance=distance)
    # make room for each class token (ascending output slots, so earlier ones stay put), then put
    # it back into the same map at its input position (ascending, so earlier ones stay put)
    for q in _positions(cls_out):
        slot = slot + (slot >= q).long()
    for p, q in zip(_positions(cls_in), _positions(cls_out)):
        cls_slot = torch.full((b, 1), q, dtype=torch.long, device=slot.device)
        slot = torch.cat([slot[:, :p], cls_slot, slot[:, p:]], dim=1)
    return slot


def _sum_into(slot: torch.Tensor, x: torch.Tensor, out_len: int, prune: bool) -> torch.Tensor:
    """``x: (b, L, k)`` summed into ``out_len`` slots (``slot: (b, L)``); the prune bin is cut off."""
    out = x.new_zeros(x.shape[0], out_len + int(prune), x.shape[-1])
    out = out.scatter_add(1, slot.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
    return out[:, :out_len] if prune else out


def match(metric, r, cls_in=None, cls_out=None, *, ordered=True, prune=False, distance="cosine") -> Merge:
    """Plan one merge on ``metric: (b, L, c)`` (class token at ``cls_in``, a tuple of two, or None) removing
    ``r`` tokens; returns ``merge(x: (b, L, k)) -> (b, L - r, k)`` that sums tokens into slots,
    the class token landing alone at ``cls_out``."""
    slot = slot_map(metric, r, cls_in, cls_out, ordered=ordered, prune=prune, distance=distance)
    out_len = metric.shape[1] - r
    return lambda x: _sum_into(slot, x, out_len, prune)


def apply_slots(slot: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor, size: torch.Tensor | None,
                out_len: int, prune: bool):
    """The size-weighted merge of hidden states and residual with a given slot map (one scatter
    for all three, fp32 sums): ``slot: (b, L)`` long, ``hidden, residual: (b, L, d)``, ``size:
    (b, L, 1)`` or None (ones) → ``(hidden', residual', size')`` with ``out_len`` tokens, dtypes
    kept, ``size'`` fp32. Differentiable in ``hidden``, ``residual`` and ``size``."""
    if size is None:
        size = hidden.new_ones(hidden.shape[0], hidden.shape[1], 1, dtype=torch.float32)
    size = size.float()
    d = hidden.shape[-1]
    packed = torch.cat([hidden.float() * size, residual.float() * size, size], dim=-1)
    merged = _sum_into(slot, packed, out_len, prune)
    new_size = merged[..., 2 * d :]
    hidden_new = (merged[..., :d] / new_size).to(hidden.dtype)
    residual_new = (merged[..., d : 2 * d] / new_size).to(residual.dtype)
    return hidden_new, residual_new, new_size


def merge_ref(hidden: torch.Tensor, residual: torch.Tensor, size: torch.Tensor | None, r: int,
              cls_in: int | tuple[int, ...] | None, cls_out: int | tuple[int, ...] | None, *, prune: bool = False,
              ordered: bool = True, distance: str = "cosine"):
    """One merge (or prune) of ``r`` tokens, matching on ``hidden``, in pure PyTorch (any device,
    autograd, exportable): the reference of :func:`~compressor.merge.fast.fast_merge`.

    ``hidden, residual: (b, L, d)``, ``size: (b, L, 1)`` or None (all ones) →
    ``(hidden', residual', size')`` with ``L - r`` tokens, dtypes kept, ``size'`` fp32. A merged
    token is the size-weighted mean of its members (the residual with the same weights).
    """
    n = hidden.shape[1] - len(_positions(cls_in))
    if not 0 <= r <= (n + 1) // 2:
        raise ValueError(f"cannot remove {r} of {n} tokens: at most {(n + 1) // 2} (one per source)")
    slot = slot_map(hidden.detach(), r, cls_in, cls_out, ordered=ordered, prune=prune, distance=distance)
    return apply_slots(slot, hidden, residual, size, hidden.shape[1] - r, prune)


def merge_wavg(merge: Merge, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average: a merged token is the mean of its members weighted by their sizes;
    its size is their sum. ``size: (b, L, 1)`` fp32. Returns ``(x', size')``, ``x'`` in x's dtype."""
    new_size = merge(size)
    return (merge(x.float() * size) / new_size).to(x.dtype), new_size


def merge_source(merge: Merge, source: torch.Tensor) -> torch.Tensor:
    """Track which original patches each token holds: ``source: (b, L, M)`` 0/1 membership."""
    return merge(source)
