"""Graph passes: trace → match → guard → replace → lint → recompile. The math is in modules."""

from __future__ import annotations

import operator

import torch.fx as fx

from ..errors import RmeetoError, ShapeError
from ..merge.module import TokenMerge
from ..merge.schedule import MergeConfig, MergeStep
from ..models.vim import Block, TokenReadout


def _modules_of(gm: fx.GraphModule, kind) -> list[fx.Node]:
    mods = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods.get(n.target), kind)]


def check_image(img, in_chans: int, img_size: int):
    """``img`` unchanged if it is ``(b, in_chans, img_size, img_size)``, else a one-line ShapeError."""
    if img.dim() != 4 or tuple(img.shape[1:]) != (in_chans, img_size, img_size):
        raise ShapeError(
            f"the compressed model takes images of shape (batch, {in_chans}, {img_size}, {img_size}) but got "
            f"{tuple(img.shape)}: its token counts were fixed at conversion; resize the images or convert a model "
            "built for this size"
        )
    return img


def guard_input(gm: fx.GraphModule, in_chans: int, img_size: int) -> None:
    """Check the image shape first: a wrong size would otherwise fail deep inside the graph with a
    broadcasting error (position embedding) instead of saying what the model expects."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise RmeetoError(f"expected one input (the images), found {len(inputs)}: is this a Vision Mamba?")
    img = inputs[0]
    with gm.graph.inserting_after(img):
        node = gm.graph.call_function(check_image, (img, in_chans, img_size))
    img.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    node.meta["rmeeto_guard"] = (in_chans, img_size)


def insert_merges(gm: fx.GraphModule, steps: list[MergeStep], cfg: MergeConfig) -> fx.Node | None:
    """Insert a :class:`TokenMerge` before each block a step names and thread hidden states,
    residual and sizes through them. Returns the node of the final sizes (None if no merge)."""
    blocks = _modules_of(gm, Block)
    size = None
    for step in steps:
        if step.layer >= len(blocks):
            raise RmeetoError(f"recipe merges before layer {step.layer} but the model has {len(blocks)} blocks")
        blk = blocks[step.layer]
        if len(blk.args) != 2 or blk.args[1] is None:
            raise RmeetoError(f"cannot merge before {blk.format_node()}: expected block(hidden, residual)")
        name = f"merge{step.layer}"
        gm.add_submodule(name, TokenMerge(step, cfg))
        with gm.graph.inserting_before(blk):
            node = gm.graph.call_module(name, (blk.args[0], blk.args[1], size))
            hidden = gm.graph.call_function(operator.getitem, (node, 0))
            residual = gm.graph.call_function(operator.getitem, (node, 1))
            size = gm.graph.call_function(operator.getitem, (node, 2))
        node.meta["rmeeto_merge"] = step
        blk.args = (hidden, residual)
    return size


def rewrite_readout(gm: fx.GraphModule, cls_index: int | None, size: fx.Node | None) -> None:
    """Point the class-token readout at the final class-token position, or make a mean
    readout size-weighted."""
    nodes = _modules_of(gm, TokenReadout)
    if len(nodes) != 1:
        raise RmeetoError(f"expected one readout node, found {len(nodes)}: is this a Vision Mamba?")
    node = nodes[0]
    gm.add_submodule(node.target, TokenReadout(cls_index))
    if cls_index is None and size is not None:
        node.args = (node.args[0], size)
    node.meta["rmeeto_readout"] = cls_index
