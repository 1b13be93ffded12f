"""torch.fx tracing of Vision Mamba (blocks as leaves) and the graph passes of the converter."""

from .passes import check_image, guard_input, insert_merges, rewrite_readout
from .tracer import VimTracer, trace

__all__ = ["VimTracer", "trace", "check_image", "guard_input", "insert_merges", "rewrite_readout"]
