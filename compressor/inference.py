"""Inference fast path: a model run as CUDA-graph replays for static shapes.

A converted model's token counts are fixed by its recipe and image size, so for a given batch
size every tensor shape in the forward is static and the whole forward (scan kernels, merges,
norms) can be captured once in a CUDA graph and replayed with one launch. At batch 1 this turns
a launch-bound forward of hundreds of kernels into a few milliseconds of GPU work; it is also
what makes a merged model faster than its baseline there (see docs/benchmarks.md).

>>> fast = compressor.optimize_for_inference(model.cuda().half())
>>> logits = fast(images.cuda().half())        # first call per input shape captures, then replays

Baseline and compressed models get the same treatment, so speed-ups stay like for like.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn as nn

from .errors import RmeetoError, first_line

__all__ = ["GraphedModel", "optimize_for_inference", "capture_graph"]

log = logging.getLogger(__name__)

MODES = ("graph", "eager")


def capture_graph(model: nn.Module, static_in: torch.Tensor, *, warmup: int = 3):
    """Capture ``model(static_in)`` in one CUDA graph. Returns ``(graph, static_out)``: refill
    ``static_in`` in place, ``graph.replay()``, read ``static_out``. Raises what capture raises.
    Call under ``torch.inference_mode()`` (or ``no_grad``) for inference."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # lazy initialisation, Triton JIT and autotuning happen here
        for _ in range(warmup):
            model(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_in)
    torch.cuda.synchronize()
    return graph, static_out


class GraphedModel(nn.Module):
    """``model`` run as CUDA-graph replays, one graph per input shape and dtype (captured on
    first use). Falls back to eager, with the reason in :attr:`note`, where capture is not
    possible (not CUDA, or capture failed). Inference only: runs under ``inference_mode``.

    ``clone_output``: return a copy of the graph's output buffer (default). With False, the
    returned tensor is overwritten by the next call of the same shape; cheaper for loops that
    consume each result at once.
    """

    def __init__(self, model: nn.Module, *, clone_output: bool = True, max_graphs: int = 8):
        super().__init__()
        self.model = model.eval()
        self.clone_output = clone_output
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, tuple] = {}
        self.note = ""

    @property
    def graphed_shapes(self) -> list[tuple]:
        """Input shapes replayed from a captured graph (a failed capture is remembered as None,
        so that it is not retried, and is not listed)."""
        return [k[0] for k, entry in self._graphs.items() if entry is not None]

    def _eager(self, x):
        with torch.inference_mode():
            return self.model(x)

    def _entry(self, x: torch.Tensor):
        key = (tuple(x.shape), x.dtype, x.device)
        if key in self._graphs:
            return self._graphs[key]
        if x.device.type != "cuda":
            self.note = "CUDA graphs need a CUDA device: running eager"
            return None
        if len(self._graphs) >= self.max_graphs:
            self.note = f"more than {self.max_graphs} input shapes: running eager for the new ones"
            return None
        static_in = x.detach().clone()
        try:
            with torch.inference_mode():
                graph, static_out = capture_graph(self.model, static_in)
        except Exception as e:  # noqa: BLE001 -- any capture failure falls back to eager, with the reason
            torch.cuda.synchronize()
            self.note = f"CUDA graph capture failed ({first_line(e, with_type=True, limit=200)}): running eager"
            log.warning(self.note)
            self._graphs[key] = None
            return None
        self._graphs[key] = (graph, static_in, static_out)
        return self._graphs[key]

    def replayer(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """A zero-argument function that runs the forward on ``x``'s current contents as fast as
        possible (graph replay without copies, or eager): for timing loops."""
        entry = self._entry(x)
        if entry is None:
            return lambda: self._eager(x)
        graph, static_in, static_out = entry
        static_in.copy_(x)

        def replay():
            graph.replay()
            return static_out

        return replay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        entry = self._entry(x)
        if entry is None:
            return self._eager(x)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone() if self.clone_output else static_out

    def reset(self) -> None:
        """Free the captured graphs (their memory pools go back to the caching allocator)."""
        for entry in self._graphs.values():
            if entry is not None:
                entry[0].reset()
        self._graphs.clear()


def optimize_for_inference(model: nn.Module, *, mode: str = "graph", clone_output: bool = True) -> nn.Module:
    """The fastest way this package knows to run ``model`` for inference on its device.

    ``graph`` (default): :class:`GraphedModel`, i.e. CUDA-graph replays per input shape, with
    the fast Triton merge on CUDA (``TokenMerge.impl = "auto"``); eager where a graph cannot be
    captured. ``eager``: the model itself in eval mode. Works for plain and converted models.
    """
    if mode not in MODES:
        raise RmeetoError(f"unknown inference mode {mode!r}: choose from {', '.join(MODES)}")
    model = model.eval()
    if mode == "eager":
        return model
    return GraphedModel(model, clone_output=clone_output)
