"""R-MeeTo's bipartite soft matching, as pure functions (after ToMe's ``tome/merge.py``).

:func:`match` looks at a metric once and returns a closure ``merge(x)`` that *sums* the tokens
of any ``(b, L, c)`` tensor into their output slots with the same assignment; size-weighted
averaging is ``merge(x * size) / merge(size)`` (:func:`merge_wavg`). The class token is taken
out before matching and comes back at ``cls_out``; that re-insertion is folded into the same
slot map, so one ``scatter_add`` moves every token (hidden states, residual, sizes, sources).
"""

from __future__ import annotations

from typing import Callable

import torch

Merge = Callable[[torch.Tensor], torch.Tensor]


def _scores(metric: torch.Tensor, distance: str) -> torch.Tensor:
    """Similarity of every source (even position) to every destination (odd position)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, 0::2], metric[:, 1::2]
    if distance == "cosine":
        return a @ b.transpose(1, 2)
    return -torch.cdist(a, b, p=1.0 if distance == "l1" else 2.0)


def _drop_cls(x: torch.Tensor, cls_in: int | None) -> torch.Tensor:
    if cls_in is None:
        return x
    return torch.cat([x[:, :cls_in], x[:, cls_in + 1 :]], dim=1)


def patch_slots(metric, r, *, ordered=True, prune=False, distance="cosine"):
    """Output slot of each patch token (class token excluded) after removing ``r`` of them.

    ``metric: (b, n, c)`` → ``slot: (b, n)`` long with values in ``[0, n - r)``; a pruned token
    gets slot ``n - r`` (a bin that is cut off). Sources are the even positions, destinations
    the odd ones; the ``r`` sources whose best cosine (or ``-cdist``) to a destination is highest
    go into that destination. ``ordered``: kept tokens keep their relative order (the paper);
    else ToMe's order ``[unmerged sources by descending score, destinations]``.
    """
    b, n, _ = metric.shape
    n_src, n_dst = (n + 1) // 2, n // 2
    node_max, node_idx = _scores(metric.float(), distance).max(dim=-1)  # (b, n_src)
    edge_idx = node_max.argsort(dim=-1, descending=True)
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


def match(metric, r, cls_in=None, cls_out=None, *, ordered=True, prune=False, distance="cosine") -> Merge:
    """Plan one merge on ``metric: (b, L, c)`` (class token at ``cls_in``, or None) removing
    ``r`` tokens; returns ``merge(x: (b, L, k)) -> (b, L - r, k)`` that sums tokens into slots,
    the class token landing alone at ``cls_out``."""
    b, L, _ = metric.shape
    slot = patch_slots(_drop_cls(metric, cls_in), r, ordered=ordered, prune=prune, distance=distance)
    out_len = L - r
    if cls_in is not None:  # make room for the class token and put it back in the same map
        slot = slot + (slot >= cls_out).long()
        cls_slot = torch.full((b, 1), cls_out, dtype=torch.long, device=slot.device)
        slot = torch.cat([slot[:, :cls_in], cls_slot, slot[:, cls_in:]], dim=1)
    bins = out_len + int(prune)  # prune: one extra bin collects the dropped tokens

    def merge(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], bins, x.shape[-1])
        out = out.scatter_add(1, slot.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
        return out[:, :out_len] if prune else out

    return merge


def merge_wavg(merge: Merge, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average: a merged token is the mean of its members weighted by their sizes;
    its size is their sum. ``size: (b, L, 1)`` fp32. Returns ``(x', size')``, ``x'`` in x's dtype."""
    new_size = merge(size)
    return (merge(x.float() * size) / new_size).to(x.dtype), new_size


def merge_source(merge: Merge, source: torch.Tensor) -> torch.Tensor:
    """Track which original patches each token holds: ``source: (b, L, M)`` 0/1 membership."""
    return merge(source)
