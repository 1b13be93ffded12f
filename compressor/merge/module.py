"""The merge node the converter inserts between blocks."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ShapeError
from .bipartite import match, merge_wavg
from .schedule import MergeConfig, MergeStep


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

    def extra_repr(self) -> str:
        mode = "prune" if self.prune else "merge"
        return (f"{mode}, tokens {self.tokens_in}->{self.tokens_in - self.r}, cls {self.cls_in}->{self.cls_out}, "
                f"ordered={self.ordered}, distance={self.distance}")

    def match(self, hidden: torch.Tensor):
        if hidden.shape[1] != self.tokens_in:
            raise ShapeError(
                f"merge before layer {self.step.layer} expects {self.tokens_in} tokens but got {hidden.shape[1]}: "
                "the model was converted for another input size; re-convert it for this image size"
            )
        return match(hidden, self.r, self.cls_in, self.cls_out, ordered=self.ordered, prune=self.prune, distance=self.distance)

    def forward(self, hidden, residual, size=None):
        merge = self.match(hidden)
        if size is None:
            size = hidden.new_ones(hidden.shape[0], hidden.shape[1], 1, dtype=torch.float32)
        # one scatter moves hidden states, residual and sizes together (fp32 sums)
        d = hidden.shape[-1]
        packed = torch.cat([hidden.float() * size, residual.float() * size, size], dim=-1)
        merged = merge(packed)
        new_size = merged[..., 2 * d :]
        hidden_new = (merged[..., :d] / new_size).to(hidden.dtype)
        residual_new = (merged[..., d : 2 * d] / new_size).to(residual.dtype)
        return hidden_new, residual_new, new_size
