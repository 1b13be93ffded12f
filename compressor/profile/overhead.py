"""What the merges themselves cost.

Two methods, both reported with their name:

- ``sliced`` (any backend): the same converted model with every :class:`TokenMerge` replaced by
  :class:`TokenSlice`, which keeps the first ``tokens_out`` tokens (a view: no kernel). Every
  layer then sees exactly the merged model's token counts, so ``(t_merged - t_sliced) / t_merged``
  is the share of the merged forward spent on merging, and ``t_base / t_sliced`` the speed-up a
  free merge would give.
- ``hooks`` (eager only): forward pre/post hooks on the merge modules synchronise the device and
  add up the wall time spent inside them, over the wall time of the whole (synchronised)
  forward. The synchronisations serialise the GPU, so on CUDA this is an upper-bound flavour of
  the number; on the CPU it is direct.

Each comes with its spread, and is flagged ``within_noise`` when it is not a measured fact: for
``sliced``, when the merged and the sliced timings' interquartile ranges overlap; for ``hooks``,
when the share's call-to-call IQR is wider than the share itself (:mod:`.stats`).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.fx as fx
import torch.nn as nn

from ..merge.module import TokenMerge
from ..merge.schedule import MergeStep
from .stats import share_within_noise, spread

__all__ = ["TokenSlice", "merge_modules", "sliced_variant", "hook_overhead"]


class TokenSlice(nn.Module):
    """Zero-cost stand-in for a :class:`TokenMerge`: ``(hidden, residual, size)`` → the first
    ``tokens_out`` tokens of each (views). For timing only: the tokens kept are not the merged
    ones, so the outputs are meaningless."""

    def __init__(self, step: MergeStep):
        super().__init__()
        self.step = step
        self.tokens_out = step.tokens_out

    def forward(self, hidden, residual, size=None):
        n = self.tokens_out
        return hidden[:, :n], residual[:, :n], None if size is None else size[:, :n]

    def extra_repr(self) -> str:
        return f"keep first {self.tokens_out} of {self.step.tokens_in} tokens"


def merge_modules(model: nn.Module) -> dict[str, TokenMerge]:
    """The merge modules of a converted model, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TokenMerge)}


def sliced_variant(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with its merges replaced by :class:`TokenSlice` (weights shared, not copied)."""
    from ..convert import ConvertedModel

    sliced = ConvertedModel(gm, copy.deepcopy(gm.graph), gm.info)
    for name, m in merge_modules(gm).items():
        parent, _, leaf = name.rpartition(".")
        setattr(sliced.get_submodule(parent) if parent else sliced, leaf, TokenSlice(m.step))
    return sliced.train(gm.training)


def hook_overhead(model: nn.Module, x: torch.Tensor, *, warmup: int = 2, repeats: int = 10, budget_s: float = 0.0,
                  min_repeats: int = 3, on_call=None) -> dict | None:
    """Median share of the forward spent inside the merge modules, timed with hooks (eager), with
    its spread over the calls. Returns None for a model without merges. ``budget_s``,
    ``min_repeats``, ``on_call``: as :func:`compressor.profile.timing.measure`."""
    merges = list(merge_modules(model).values())
    if not merges:
        return None
    cuda = x.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    spent = [0.0]
    started = [0.0]

    def pre(_mod, _args):
        sync()
        started[0] = time.perf_counter()

    def post(_mod, _args, _out):
        sync()
        spent[0] += time.perf_counter() - started[0]

    handles = [h for m in merges for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    fractions, merge_ms, total_ms = [], [], []
    repeats = max(1, repeats)
    i = 0
    try:
        with torch.inference_mode():
            while i < warmup + repeats:
                spent[0] = 0.0
                sync()
                t0 = time.perf_counter()
                model(x)
                sync()
                total = time.perf_counter() - t0
                if budget_s > 0 and i == max(warmup - 1, 0):  # size the series from the first call
                    repeats = max(min(min_repeats, repeats), min(repeats, int(budget_s / max(total, 1e-9))))
                if i >= warmup:
                    fractions.append(spent[0] / total)
                    merge_ms.append(spent[0] * 1e3)
                    total_ms.append(total * 1e3)
                i += 1
                if on_call is not None:
                    on_call(i, warmup + repeats)
    finally:
        for h in handles:
            h.remove()
    fwd, frac = spread(total_ms), spread(fractions)
    merge = statistics.median(merge_ms)
    return {
        "method": "hooks",
        "backend": "eager",
        "batch_size": x.shape[0],
        "merge_ms": merge,
        "forward_ms": fwd["median"],
        "forward_ms_q1": fwd["q1"],
        "forward_ms_q3": fwd["q3"],
        "overhead_fraction": frac["median"],
        "overhead_fraction_q1": frac["q1"],
        "overhead_fraction_q3": frac["q3"],
        "repeats": len(fractions),
        "within_noise": share_within_noise(frac),
    }
