"""The merge node the converter inserts between blocks."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ShapeError
from . import fast
from .bipartite import match
from .schedule import MergeConfig, MergeStep

#: How a merge runs: ``torch`` (the reference: pure PyTorch, autograd, any device, exportable),
#: ``triton`` (:mod:`compressor.merge.fast`: three kernels, inference only), ``auto`` (triton
#: on CUDA when it applies: no gradient needed, not inside torch.compile or export; else torch).
MERGE_IMPLS = ("auto", "torch", "triton")


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
        self._check(hidden)
        return self._plan(hidden)

    def _plan(self, hidden: torch.Tensor):
        return match(hidden, self.r, self.cls_in, self.cls_out, ordered=self.ordered, prune=self.prune, distance=self.distance)

    def _use_fast(self, hidden: torch.Tensor, residual: torch.Tensor) -> bool:
        if self.impl == "torch":
            return False
        ok = fast.available() and fast.supports(ordered=self.ordered, distance=self.distance, tokens=hidden.shape[1],
                                                width=hidden.shape[-1])
        if self.impl == "triton":
            if not ok:
                raise ValueError(f"the triton merge does not support this merge ({self.extra_repr()}, width "
                                 f"{hidden.shape[-1]}): use impl 'torch' or 'auto'")
            return True
        needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or residual.requires_grad)
        return (ok and inference_merge_impl("auto", hidden.device.type) == "triton" and not needs_grad
                and not torch.compiler.is_compiling())

    def forward(self, hidden, residual=None, size=None):
        """``residual`` None: blocks that keep the residual inside (``block(hidden) -> hidden``);
        it comes back None. The merge is computed as if the hidden states were the residual too."""
        if residual is None:
            hidden, _, size = self.forward(hidden, hidden, size)
            return hidden, None, size
        self._check(hidden)
        if self._use_fast(hidden, residual):
            return fast.fast_merge(hidden, residual, size, self.r, self.cls_in, self.cls_out, prune=self.prune)
        merge = self._plan(hidden)
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


def inference_merge_impl(impl: str, device_type: str) -> str:
    """The merge that runs for inference (no gradients) on ``device_type`` under ``impl``:
    ``auto`` is ``triton`` on CUDA when Triton is installed, else ``torch``."""
    if impl != "auto":
        return impl
    return "triton" if device_type == "cuda" and fast.available() else "torch"


def set_merge_impl(model: nn.Module, impl: str) -> int:
    """Make every :class:`TokenMerge` in ``model`` run with ``impl`` (see :data:`MERGE_IMPLS`);
    returns how many merges were set."""
    if impl not in MERGE_IMPLS:
        raise ValueError(f"unknown merge implementation {impl!r}: choose from {', '.join(MERGE_IMPLS)}")
    merges = [m for m in model.modules() if isinstance(m, TokenMerge)]
    for m in merges:
        m.impl = impl
    return len(merges)
