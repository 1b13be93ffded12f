"""Post-processing of the exported ONNX graph: a light optimisation and the node count per block.

The exporter's own ``optimize=True`` runs onnxscript's pattern rewriter over every node (tens of
rules each): on a depth-24 Vim that alone took minutes on a 2-core CPU. ONNX Runtime applies its
own graph optimisations when a session starts, so here only what a runtime cannot do cheaply is
done: inline functions, fold constants (the shape arithmetic of a static graph), drop unused
nodes, de-duplicate initializers and common subexpressions.
"""

from __future__ import annotations

import ast
import re
from collections import Counter

__all__ = ["light_optimize", "block_node_counts"]

_BLOCK = re.compile(r"^layers\.(\d+)$")


def light_optimize(model) -> None:
    """Optimise an ``onnx_ir`` model in place (see the module docstring). Falls back to
    onnxscript's full optimiser when the light passes are not available in this version."""
    try:
        import onnx_ir as ir
        import onnx_ir.passes.common as common
        import onnxscript.optimizer as opt
    except ImportError:  # pragma: no cover - depends on the installed onnxscript
        from onnxscript.optimizer import optimize_ir

        optimize_ir(model)
        return
    ir.passes.Sequential(common.InlinePass(), common.RemoveUnusedNodesPass())(model)
    opt.fold_constants(model)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.NameFixPass(),
    )(model)


def block_node_counts(model) -> dict[int, int]:
    """Top-level nodes per block ``layers.i`` of an ``onnx_ir`` model (what the exporter records
    in each node's ``pkg.torch.onnx.name_scopes``); nodes outside any block are not counted.
    Empty when the exporter did not record scopes."""
    counts: Counter = Counter()
    for node in model.graph:
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        if not scopes:
            continue
        try:
            names = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            continue
        for name in names:
            m = _BLOCK.match(str(name))
            if m:
                counts[int(m.group(1))] += 1
                break
    return dict(sorted(counts.items()))
