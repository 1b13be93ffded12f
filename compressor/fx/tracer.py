"""A torch.fx tracer that keeps the Mamba blocks (and the merge/readout nodes) as leaves."""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
from timm.layers import DropPath

from ..merge.module import TokenMerge
from ..models.vim import Block, RMSNorm, TokenReadout

# DropPath must stay a module: traced through, its ``if not self.training`` would be decided
# once at trace time (a graph traced in eval mode never drops, one traced in train mode always does)
LEAVES = (Block, RMSNorm, TokenReadout, TokenMerge, DropPath)


class VimTracer(fx.Tracer):
    """Blocks, norms, readouts, merges and drop paths are single ``call_module`` nodes; the rest
    is traced."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LEAVES) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    graph = VimTracer().trace(model)
    return fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Graph")
