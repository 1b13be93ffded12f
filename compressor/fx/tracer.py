"""A torch.fx tracer that keeps the Mamba blocks (and the merge/readout nodes) as leaves."""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..merge.module import TokenMerge
from ..models.vim import Block, RMSNorm, TokenReadout

LEAVES = (Block, RMSNorm, TokenReadout, TokenMerge)


class VimTracer(fx.Tracer):
    """Blocks, norms, readouts and merges are single ``call_module`` nodes; the rest is traced."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LEAVES) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    graph = VimTracer().trace(model)
    return fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Graph")
