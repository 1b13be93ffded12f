"""The merge node the converter inserts between blocks."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ShapeError
from .bipartite import match
from .dispatch import MERGE_IMPLS, inference_merge_impl, merge_tokens
from .schedule import MergeConfig, MergeStep

__all__ = ["MERGE_IMPLS", "TokenMerge", "inference_merge_impl", "set_merge_impl"]


class TokenMerge(nn.Module):
    """Merge before a block: ``(hidden, residual, size) -> (hidden, residual, size)``.

    Matching uses the metric (``x``: the previous mixer's output, ``hidden``); the residual is
    merged with the same assignment and the same (old) sizes. Token counts and class-token
    positions are fixed when the model is converted (static shapes), so an input of another
    size is refused with a clear error instead of being merged wrongly.
    """

    def __init__(self, step: MergeStep, cfg: MergeConfig):
        super().__init__()
        self.step = step
        self.r, self.tokens_in = step.r, step.tokens_in
        self.cls_in, self.cls_out = step.cls_in, step.cls_out
        self.prune = cfg.mode == "prune"
        self.ordered = cfg.ordered
        self.distance = cfg.distance
        self.impl = "auto"

    def extra_repr(self) -> str:
        mode = "prune" if self.prune else "merge"
        return (f"{mode}, tokens {self.tokens_in}->{self.tokens_in - self.r}, cls {self.cls_in}->{self.cls_out}, "
                f"ordered={self.ordered}, distance={self.distance}")

    def _check(self, hidden: torch.Tensor) -> None:
        if hidden.shape[1] != self.tokens_in:
            raise ShapeError(
                f"merge before layer {self.step.layer} expects {self.tokens_in} tokens but got {hidden.shape[1]}: "
                "the model was converted for another input size; re-convert it for this image size"
            )

    def match(self, hidden: torch.Tensor):
        """The assignment as a closure ``merge(x)`` that sums tokens into slots (for source maps)."""
        self._check(hidden)
        return match(hidden, self.r, self.cls_in, self.cls_out, ordered=self.ordered, prune=self.prune,
                     distance=self.distance)

    def forward(self, hidden, residual=None, size=None):
        """``impl`` (see :mod:`compressor.merge.dispatch`) picks the reference or the kernels.
        ``residual`` None: blocks that keep the residual inside (``block(hidden) -> hidden``);
        it comes back None. The merge is computed as if the hidden states were the residual too."""
        if residual is None:
            hidden, _, size = self.forward(hidden, hidden, size)
            return hidden, None, size
        self._check(hidden)
        return merge_tokens(hidden, residual, size, self.r, self.cls_in, self.cls_out, prune=self.prune,
                            ordered=self.ordered, distance=self.distance, impl=self.impl)


def set_merge_impl(model: nn.Module, impl: str) -> int:
    """Make every :class:`TokenMerge` in ``model`` run with ``impl`` (see :data:`MERGE_IMPLS`);
    returns how many merges were set."""
    if impl not in MERGE_IMPLS:
        raise ValueError(f"unknown merge implementation {impl!r}: choose from {', '.join(MERGE_IMPLS)}")
    merges = [m for m in model.modules() if isinstance(m, TokenMerge)]
    for m in merges:
        m.impl = impl
    return len(merges)
