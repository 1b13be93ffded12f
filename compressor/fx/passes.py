"""Graph passes: trace → match → guard → replace → lint → recompile. The math is in modules."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..errors import RmeetoError, ShapeError
from ..merge.module import TokenMerge
from ..merge.schedule import MergeConfig, MergeStep
from ..models.vim import TokenReadout
from .discover import BlockCalls, Readout

__all__ = ["check_input", "guard_input", "insert_merges", "rewrite_readouts", "weighted_token_mean", "zoo_readouts"]


def check_input(x, shape: tuple):
    """``x`` unchanged if it is ``(batch, *shape)``, else a one-line ShapeError."""
    if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape):
        raise ShapeError(
            f"the compressed model takes inputs of shape (batch, {', '.join(map(str, shape))}) but got "
            f"{tuple(x.shape)}: its token counts were fixed at conversion; resize the inputs or convert a model "
            "built for this size"
        )
    return x


def guard_input(gm: fx.GraphModule, shape: tuple) -> None:
    """Check the input shape first: a wrong size would otherwise fail deep inside the graph with
    a broadcasting error (position embedding) instead of saying what the model expects."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise RmeetoError(f"expected one input (the images), found {len(inputs)}: is this a Vision Mamba?")
    img = inputs[0]
    with gm.graph.inserting_after(img):
        node = gm.graph.call_function(check_input, (img, tuple(shape)))
    img.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    node.meta["rmeeto_guard"] = tuple(shape)


def insert_merges(gm: fx.GraphModule, calls: BlockCalls, steps: list[MergeStep], cfg: MergeConfig) -> fx.Node | None:
    """Insert a :class:`TokenMerge` before each block a step names and thread hidden states,
    residual (when the blocks pass one) and sizes through them. Returns the node of the final
    sizes (None if no merge)."""
    size = None
    for step in steps:
        if step.layer >= len(calls.nodes):
            raise RmeetoError(f"recipe merges before layer {step.layer} but the model has {len(calls.nodes)} blocks")
        blk = calls.nodes[step.layer]
        hidden, residual = calls.hidden_in(step.layer), calls.residual_in(step.layer)
        name = f"merge{step.layer}"
        gm.add_submodule(name, TokenMerge(step, cfg))
        with gm.graph.inserting_before(blk):
            node = gm.graph.call_module(name, (hidden, residual, size))
            new_hidden = gm.graph.call_function(operator.getitem, (node, 0))
            new_residual = gm.graph.call_function(operator.getitem, (node, 1)) if residual is not None else None
            size = gm.graph.call_function(operator.getitem, (node, 2))
        node.meta["rmeeto_merge"] = step
        args = list(blk.args)
        args[0] = new_hidden
        if residual is not None:
            if len(args) > 1:
                args[1] = new_residual
            else:
                blk.kwargs = {**blk.kwargs, "residual": new_residual}
        blk.args = tuple(args)
    return size


def weighted_token_mean(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``x: (b, L, d)`` where token ``i`` stands for ``size[:, i]`` original
    tokens (``size: (b, L, 1)``): the mean the unmerged model would take."""
    return (x * size.to(x.dtype)).sum(dim=1) / size.sum(dim=1).to(x.dtype)


def zoo_readouts(gm: fx.GraphModule) -> list[Readout]:
    """The :class:`~compressor.models.vim.TokenReadout` node of rmeeto's own models."""
    mods = dict(gm.named_modules())
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods.get(n.target), TokenReadout)]
    if len(nodes) != 1:
        raise RmeetoError(f"expected one readout node, found {len(nodes)}: is this a Vision Mamba?")
    index = mods[nodes[0].target].index
    return [Readout(nodes[0], "module", index)]


def rewrite_readouts(gm: fx.GraphModule, readouts: list[Readout], new_position: dict, size: fx.Node | None) -> None:
    """Point each class-token readout at its class token's final position (``new_position``:
    input position → final position, one entry per class token; only that use of the index
    changes: the same index node may also have placed the class token) and make mean readouts
    size-weighted."""
    for r in readouts:
        if r.kind == "module":
            index = None if r.position is None else new_position[r.position]
            gm.add_submodule(r.node.target, TokenReadout(index))
            if index is None and size is not None:
                r.node.args = (r.node.args[0], size)
            r.node.meta["rmeeto_readout"] = index
        elif r.kind == "token":
            src, idx = r.node.args
            r.node.args = (src, (idx[0], new_position[r.position], *idx[2:]))
            r.node.meta["rmeeto_readout"] = new_position[r.position]
        elif r.kind == "mean" and size is not None:
            with gm.graph.inserting_after(r.node):
                node = gm.graph.call_function(weighted_token_mean, (r.node.args[0], size))
            r.node.replace_all_uses_with(node)
            gm.graph.erase_node(r.node)
            node.meta["rmeeto_readout"] = None
