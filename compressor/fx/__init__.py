"""torch.fx tracing of Vision Mamba (blocks as leaves) and the graph passes of the converter."""

from .passes import insert_merges, rewrite_readout
from .tracer import VimTracer, trace

__all__ = ["VimTracer", "trace", "insert_merges", "rewrite_readout"]
