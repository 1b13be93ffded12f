"""Predicted and measured speed of a merge schedule.

Every block of a Vision Mamba has the same shapes, so its time depends only on the number of
tokens it processes. A schedule's forward time is predicted from a table of per-length timings::

    t(s) = t_plain + alpha * ( sum_{i >= 1} [block(L_i) - block(N)]  +  sum_merges merge(L_in) )

with ``t_plain`` the whole plain model measured in the same run, ``block(L)`` one block timed
alone at ``L`` tokens, ``merge(L_in)`` one merge of ``L_in`` tokens timed alone (removing half
its cap: the count barely changes a merge's cost, which is the matching of all ``L_in`` tokens
and, at small batch, its kernel launches), and ``alpha`` (1 until
calibrated) the ratio of measured to predicted savings of whole models timed by the search. Each
length is timed once (lazily, when a schedule first needs it) and cached, so most schedules cost
a sum, not a measurement; the search times the final few whole (:meth:`whole_ms`) to confirm.

:class:`MeasuredTiming` times on a device the way ``rmeeto profile`` does
(:func:`compressor.profile.timing.time_backend`: one CUDA graph per callable on CUDA, eager on the
CPU, median of ``repeats`` calls after ``warmup``). :class:`TableTiming` replays given numbers
(tests, or a table saved in a search report).
"""

from __future__ import annotations

import copy
import time
from typing import Callable

import torch
import torch.nn as nn

from ..convert import convert
from ..errors import RmeetoError
from ..merge import TokenMerge, set_merge_impl
from ..merge.schedule import MergeConfig, MergeStep, class_token_after, merge_cap
from ..models.vim import VisionMamba, set_backend
from ..profile.timing import time_backend
from .space import Schedule, Space

__all__ = ["TimingModel", "MeasuredTiming", "TableTiming", "predict_ms"]


class TimingModel:
    """Per-length timings (ms per forward of one batch) with a cache; subclasses measure."""

    def __init__(self, space: Space):
        self.space = space
        self.blocks: dict[int, float] = {}
        self.merges: dict[int, float] = {}
        self.alpha = 1.0
        self.plain_ms = float("nan")
        self.measure_s = 0.0  # wall time spent measuring (for the report)
        self.backend = "table"  # how wholes and parts are run: graph, eager (measured) or table (given)
        self.rows: list[dict] = []  # one per measurement (for the report)
        self._savings: dict[Schedule, float] = {}

    # subclasses: the measurements
    def _block(self, tokens: int) -> float:
        raise NotImplementedError

    def _merge(self, tokens_in: int) -> float:
        raise NotImplementedError

    def whole_ms(self, s: Schedule) -> float:
        """The whole model under ``s``, timed end to end (not predicted)."""
        raise NotImplementedError

    def measure_plain(self) -> float:
        """(Re-)measure the plain model whole; sets :attr:`plain_ms`."""
        self.plain_ms = self.whole_ms(self.space.plain())
        return self.plain_ms

    # cached lookups
    def block_ms(self, tokens: int) -> float:
        if tokens not in self.blocks:
            self.blocks[tokens] = self._block(tokens)
        return self.blocks[tokens]

    def merge_ms(self, tokens_in: int) -> float:
        if tokens_in not in self.merges:
            self.merges[tokens_in] = self._merge(tokens_in)
        return self.merges[tokens_in]

    def savings_ms(self, s: Schedule) -> float:
        """Predicted change of the forward time under ``s`` (negative: faster), before ``alpha``."""
        if s not in self._savings:
            self._savings[s] = self._sum_parts(s)
        return self._savings[s]

    def _sum_parts(self, s: Schedule) -> float:
        space = self.space
        full = self.block_ms(space.num_tokens)
        delta = sum(self.block_ms(n) - full for n in space.tokens(s)[1:])
        return delta + sum(self.merge_ms(n) for n, _ in space.merges(s))

    def predict(self, s: Schedule) -> float:
        return predict_ms(self, s)

    def table(self) -> dict:
        """The cached timings, plain data (goes into the report)."""
        return {"plain_ms": self.plain_ms, "alpha": self.alpha,
                "block_ms": {str(k): v for k, v in sorted(self.blocks.items())},
                "merge_ms": {str(k): v for k, v in sorted(self.merges.items())}}


def predict_ms(timing: TimingModel, s: Schedule) -> float:
    """``t_plain + alpha * savings`` (module docstring)."""
    return timing.plain_ms + timing.alpha * timing.savings_ms(s)


class TableTiming(TimingModel):
    """Timings from functions: ``block(L)``, ``merge(L_in)`` in ms, and optionally ``whole(s)``
    (default: the prediction with ``alpha = 1``, i.e. a perfectly additive model)."""

    def __init__(self, space: Space, block: Callable[[int], float], merge: Callable[[int], float],
                 plain_ms: float, whole: Callable[[Schedule], float] | None = None):
        super().__init__(space)
        self._block_fn, self._merge_fn, self._whole_fn = block, merge, whole
        self.plain_ms = plain_ms
        self.whole_calls = 0

    def _block(self, tokens):
        return float(self._block_fn(tokens))

    def _merge(self, tokens_in):
        return float(self._merge_fn(tokens_in))

    def whole_ms(self, s):
        self.whole_calls += 1
        if self._whole_fn is not None:
            return float(self._whole_fn(s))
        return self.plain_ms + self.savings_ms(s)

    def measure_plain(self):
        return self.plain_ms if self._whole_fn is None else super().measure_plain()


# -------------------------------------------------------------------------------------------- measured


class _BlockAt(nn.Module):
    """One block on a fixed residual: ``x -> block(x, residual)`` (what layers 1.. run)."""

    def __init__(self, block: nn.Module, residual: torch.Tensor):
        super().__init__()
        self.block, self.residual = block, residual

    def forward(self, x):
        return self.block(x, self.residual)


class _MergeAt(nn.Module):
    """One merge on a fixed residual and sizes: ``x -> merge(x, residual, size)``."""

    def __init__(self, merge: TokenMerge, residual: torch.Tensor, size: torch.Tensor):
        super().__init__()
        self.merge, self.residual, self.size = merge, residual, size

    def forward(self, x):
        return self.merge(x, self.residual, self.size)


class MeasuredTiming(TimingModel):
    """Timings measured on ``device`` at ``batch_size`` in ``dtype`` (fp16 on CUDA, fp32 on CPU in
    the CLI). ``backend``: ``graph`` (CUDA) or ``eager``. ``model`` is the plain model; a copy is
    cast and moved, the original is left alone. ``ops``/``merge_impl`` as ``rmeeto profile``."""

    def __init__(self, model: VisionMamba, space: Space, *, batch_size: int, device: str, dtype: torch.dtype,
                 backend: str, warmup: int = 5, repeats: int = 30, part_repeats: int = 10, ops: str = "auto",
                 merge_impl: str = "auto", seed: int = 0):
        super().__init__(space)
        if backend == "graph" and device != "cuda":
            raise RmeetoError("graph timing needs CUDA: time with backend eager on the CPU")
        self.model, self.device, self.dtype, self.backend = model, device, dtype, backend
        self.batch_size, self.warmup, self.repeats, self.part_repeats = batch_size, warmup, repeats, part_repeats
        self.ops, self.merge_impl = ops, merge_impl
        self.merge_cfg = MergeConfig(mode=space.mode, ordered=space.ordered, distance=space.distance)
        cfg = model.cfg
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g).to(device, dtype)
        self._hidden = torch.randn(batch_size, cfg.num_tokens, cfg.embed_dim, generator=g).to(device, dtype)
        self.block = set_backend(copy.deepcopy(model.layers[min(1, cfg.depth - 1)]), ops).to(device, dtype).eval()
        with torch.inference_mode():
            _, self._residual = self.block(self._hidden, None)  # the residual's dtype as layers 1.. see it

    def _time(self, module: nn.Module, x: torch.Tensor, repeats: int, what: str) -> float:
        t0 = time.perf_counter()
        row = time_backend(module, self.backend, x, warmup=min(self.warmup, 3) if repeats < self.repeats else self.warmup,
                           repeats=repeats)
        self.measure_s += time.perf_counter() - t0
        if row["latency_ms_median"] is None:
            raise RmeetoError(f"timing {what} failed ({row['note']}): try --device cpu or another --ops backend")
        self.rows.append({"what": what, "ms": row["latency_ms_median"], "status": row["status"], "note": row["note"]})
        return row["latency_ms_median"]

    def _block(self, tokens):
        x = self._hidden[:, :tokens].contiguous()
        res = self._residual[:, :tokens].contiguous()
        return self._time(_BlockAt(self.block, res), x, self.part_repeats, f"block at {tokens} tokens")

    def _merge(self, tokens_in):
        r = max(1, merge_cap(tokens_in, self.space.cls_index is not None) // 2)
        cls = self.space.cls_index
        cls_in = None if cls is None else (cls * tokens_in) // self.space.num_tokens  # where it sits at this length
        step = MergeStep(1, tokens_in, r, cls_in, class_token_after(cls_in, tokens_in, r, self.space.ordered))
        merge = TokenMerge(step, self.merge_cfg)
        merge.impl = self.merge_impl
        x = self._hidden[:, :tokens_in].contiguous()
        res = self._residual[:, :tokens_in].contiguous()
        size = torch.ones(x.shape[0], tokens_in, 1, device=x.device, dtype=torch.float32)
        return self._time(_MergeAt(merge, res, size), x, self.part_repeats, f"merge at {tokens_in} tokens")

    def whole_ms(self, s):
        gm = convert(self.model, self.space.config(s))
        gm = set_backend(gm.eval(), self.ops).to(self.device, self.dtype)
        set_merge_impl(gm, self.merge_impl)
        try:
            return self._time(gm, self.images, self.repeats, f"whole {self.space.describe(s)}")
        finally:
            del gm
            if self.device == "cuda":
                torch.cuda.empty_cache()
