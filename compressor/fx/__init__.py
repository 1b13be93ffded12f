"""torch.fx tracing of Vision Mamba models (rmeeto's and foreign ones), discovery of their
structure, and the graph passes of the converter."""

from .discover import BlockCalls, Hints, Readout, TokenLayout, find_block_calls, find_block_stack, find_readouts, probe
from .passes import check_input, guard_input, insert_merges, rewrite_readouts, weighted_token_mean, zoo_readouts
from .tracer import MambaTracer, foreign_functions, trace

__all__ = [
    "BlockCalls",
    "Hints",
    "MambaTracer",
    "Readout",
    "TokenLayout",
    "check_input",
    "find_block_calls",
    "find_block_stack",
    "find_readouts",
    "foreign_functions",
    "guard_input",
    "insert_merges",
    "probe",
    "rewrite_readouts",
    "trace",
    "weighted_token_mean",
    "zoo_readouts",
]
