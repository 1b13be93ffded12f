"""Finding the structure of a Vision Mamba the converter did not write.

A convertible model maps images to a token sequence ``(batch, tokens, dim)``, runs it through a
stack of blocks (one ``nn.ModuleList``/``nn.Sequential`` of modules of one class holding a Mamba
mixer, i.e. a parameter named ``A_log``), each called once in order as
``block(hidden, residual, ...) -> (hidden, residual)`` or ``block(hidden) -> hidden``, then reads
one or two class-token positions (``x[:, i]``) or the mean over tokens (``x.mean(1)``).

Discovery in four steps, each failing with one line that names what was not found and the hint
that helps (``hints``: ``blocks`` = the block container's name, ``cls_param`` = the class-token
parameter, ``leaves`` = extra module classes to keep whole, ``leaf_functions`` = functions to
keep whole):

1. :func:`find_block_stack`: the block container, by module structure;
2. :func:`find_block_calls`: the blocks' call nodes in the traced graph, and how they are called;
3. :func:`probe`: one forward on an example input records every node's shape; the first block's
   input gives the token count and width; adding 1 to each candidate class-token parameter
   (shape ``(…, dim)`` with one or two rows) and re-running the embedding shows which positions
   of the first block's input it moves: those are the class-token positions;
4. :func:`find_readouts`: following the token tensors from the last block to the first node that
   removes the token axis: ``x[:, i]`` must read a class-token position, ``x.mean(1)`` is a mean.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import RmeetoError

__all__ = ["Hints", "TokenLayout", "BlockCalls", "Readout", "find_block_stack", "find_block_calls", "probe",
           "find_readouts", "SSM_PARAM"]

#: Every Mamba implementation names the log of its state matrix so (mamba-ssm, Vim, VideoMamba).
SSM_PARAM = "A_log"

HINT_KEYS = ("blocks", "cls_param", "leaves", "leaf_functions")


@dataclass(frozen=True)
class Hints:
    """Help for discovery where a model is unusual (see the module docstring)."""

    blocks: str | None = None
    cls_param: str | None = None
    leaves: tuple = ()
    leaf_functions: tuple = ()

    @classmethod
    def of(cls, hints) -> "Hints":
        if hints is None or isinstance(hints, Hints):
            return hints or cls()
        if not isinstance(hints, dict):
            raise RmeetoError(f"hints must be a dict with keys {', '.join(HINT_KEYS)}, got {type(hints).__name__}")
        unknown = sorted(set(hints) - set(HINT_KEYS))
        if unknown:
            raise RmeetoError(f"unknown hint {unknown[0]!r}: the hints are {', '.join(HINT_KEYS)}")
        return cls(hints.get("blocks"), hints.get("cls_param"), tuple(hints.get("leaves", ())),
                   tuple(hints.get("leaf_functions", ())))

    def to_dict(self) -> dict:
        """The parts that can be stored in a checkpoint (names, not classes or functions)."""
        return {k: v for k, v in (("blocks", self.blocks), ("cls_param", self.cls_param)) if v is not None}


@dataclass(frozen=True)
class TokenLayout:
    """What a converted model's token sequence looks like before any merge.

    ``cls_index``: the class token's position, a tuple of two for two class tokens, None for a
    mean readout. ``input_shape``: one input without the batch axis, e.g. ``(3, 224, 224)``.
    ``block_call``: ``"hidden_residual"`` or ``"hidden"``. ``readout``: ``"token"`` or ``"mean"``.
    """

    num_tokens: int
    embed_dim: int
    depth: int
    cls_index: int | tuple[int, int] | None
    input_shape: tuple[int, ...]
    num_classes: int
    blocks: str = "layers"
    block_call: str = "hidden_residual"
    readout: str = "token"
    cls_param: str | None = None

    @property
    def img_size(self) -> int:
        return self.input_shape[-1]

    @property
    def in_chans(self) -> int:
        return self.input_shape[0]

    @property
    def grid(self) -> int | None:
        """Side of the square patch grid, if the patch tokens form one."""
        n = self.num_tokens - _count(self.cls_index)
        side = int(round(n**0.5))
        return side if side * side == n else None

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["input_shape"] = list(self.input_shape)
        if isinstance(self.cls_index, tuple):
            d["cls_index"] = list(self.cls_index)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        d = dict(d)
        d["input_shape"] = tuple(d["input_shape"])
        if isinstance(d.get("cls_index"), list):
            d["cls_index"] = tuple(d["cls_index"])
        return cls(**d)


def _count(cls_index) -> int:
    return 0 if cls_index is None else len(cls_index) if isinstance(cls_index, tuple) else 1


# --------------------------------------------------------------------------------------------
# 1. the block stack, by module structure


def _is_mamba_block(m: nn.Module) -> bool:
    return any(name.rsplit(".", 1)[-1] == SSM_PARAM for name, _ in m.named_parameters())


def _stacks(model: nn.Module) -> list[str]:
    """Outermost containers whose children are all Mamba blocks of one class."""
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod):
            kids = list(mod.children())
            if len({type(k) for k in kids}) == 1 and all(_is_mamba_block(k) for k in kids):
                found.append(name)
    return [s for s in found if not any(s.startswith(o + ".") for o in found if o != s)]


def find_block_stack(model: nn.Module, hints: Hints) -> tuple[str, list[str], list[str]]:
    """``(container, block names, other stacks)``: the qualified names of the block container
    and of its blocks in order, and the names of other block stacks (for the interleave check)."""
    stacks = _stacks(model)
    if hints.blocks is not None:
        try:
            mod = model.get_submodule(hints.blocks)
        except AttributeError:
            raise RmeetoError(f"hints['blocks'] = {hints.blocks!r} is not a submodule of {type(model).__name__}") from None
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or not len(mod):
            raise RmeetoError(f"hints['blocks'] = {hints.blocks!r} is a {type(mod).__name__}, not a ModuleList/Sequential "
                              "of blocks: name the container that holds the blocks")
        chosen = hints.blocks
    elif not stacks:
        raise RmeetoError(
            f"no stack of Mamba blocks found in {type(model).__name__} (looked for a ModuleList/Sequential of one "
            f"block class whose blocks hold a Mamba mixer, i.e. a parameter named {SSM_PARAM!r}): rmeeto converts "
            "Vision Mamba models; if this is one, name its block container with hints={'blocks': '<name>'}"
        )
    elif len(stacks) > 1:
        raise RmeetoError(
            f"{type(model).__name__} has {len(stacks)} stacks of Mamba blocks ({', '.join(stacks)}): rmeeto merges "
            "tokens between the blocks of one stack; choose it with hints={'blocks': '<name>'}"
        )
    else:
        chosen = stacks[0]
    container = model.get_submodule(chosen)
    prefix = f"{chosen}." if chosen else ""
    return chosen, [f"{prefix}{name}" for name, _ in container.named_children()], [s for s in stacks if s != chosen]


def containers_of(block_container: str, container_called: bool = True) -> list[str]:
    """Qualified names the tracer must trace through to see the block calls: the root, every
    ancestor of the container, and the container itself (an ``nn.Sequential`` called whole)."""
    parts = block_container.split(".") if block_container else []
    names = [""] + [".".join(parts[: i + 1]) for i in range(len(parts))]
    return names if container_called else names[:-1]


# --------------------------------------------------------------------------------------------
# 2. the block calls in the graph


@dataclass
class BlockCalls:
    """The call node of each block in order, and how blocks are called."""

    nodes: list[fx.Node]
    style: str  # "hidden_residual" | "hidden"

    def hidden_in(self, i: int) -> fx.Node:
        return self.nodes[i].args[0]

    def residual_in(self, i: int):
        node = self.nodes[i]
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("residual")

    def outputs(self, i: int) -> list[fx.Node]:
        """The nodes that carry block ``i``'s output(s) onwards."""
        node = self.nodes[i]
        return list(node.users) if self.style == "hidden_residual" else [node]


def find_block_calls(gm: fx.GraphModule, blocks: list[str], others: list[str] = ()) -> BlockCalls:
    """Check each block is called once, in order, with the hidden states first; tell the call style."""
    wanted = set(blocks)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in wanted]
    targets = [n.target for n in calls]
    if targets != blocks:
        missing = [b for b in blocks if b not in targets]
        twice = sorted({t for t in targets if targets.count(t) > 1})
        why = (f"block {missing[0]} is never called" if missing else f"block {twice[0]} is called {targets.count(twice[0])} times"
               if twice else f"the blocks are called in the order {', '.join(targets[:4])}, ...")
        raise RmeetoError(f"{why}: rmeeto merges between blocks called once each, in order, as block(hidden, ...)")
    _check_not_interleaved(gm, calls, others)
    for n in calls:
        if not n.args or not isinstance(n.args[0], fx.Node):
            raise RmeetoError(f"cannot read the hidden states of {n.format_node()}: call the blocks with the hidden states "
                              "as the first positional argument")
    style = _call_style(calls)
    return BlockCalls(calls, style)


def _check_not_interleaved(gm: fx.GraphModule, calls: list[fx.Node], others: list[str]) -> None:
    if not others:
        return
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first, last = order[calls[0]], order[calls[-1]]
    for n in gm.graph.nodes:
        if n.op == "call_module" and first < order[n] < last and any(str(n.target).startswith(o + ".") for o in others):
            raise RmeetoError(
                f"block {n.target} of another stack runs between the blocks of {calls[0].target.rsplit('.', 1)[0]}: "
                "two interleaved block stacks cannot be merged consistently (each would see the other's token count)"
            )


def _call_style(calls: list[fx.Node]) -> str:
    def tuple_out(n: fx.Node) -> bool:
        return bool(n.users) and all(u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1)
                                     for u in n.users)

    styles = {"hidden_residual" if tuple_out(n) else "hidden" for n in calls[:-1] or calls}
    if len(styles) != 1:
        raise RmeetoError("the blocks are called in two styles (some return (hidden, residual), some hidden): "
                          "rmeeto needs one calling convention for the whole stack")
    style = styles.pop()
    if style == "hidden_residual":
        for n in calls[1:]:
            if not isinstance(BlockCalls([n], style).residual_in(0), fx.Node):
                raise RmeetoError(f"{n.format_node()} returns (hidden, residual) but is called without the residual")
    return style


# --------------------------------------------------------------------------------------------
# 3. probing: shapes, token count, class-token positions


class _Stop(Exception):
    pass


class _Recorder(fx.Interpreter):
    """Runs the graph and writes each node's tensor shape (``rmeeto_shape``) or small Python value
    (``rmeeto_value``) into ``node.meta``; can stop at a node and return its arguments."""

    def __init__(self, gm: fx.GraphModule, stop_at: fx.Node | None = None):
        super().__init__(gm)
        self.stop_at = stop_at
        self.stopped_args = None

    def run_node(self, n: fx.Node):
        if n is self.stop_at:
            self.stopped_args = self.fetch_args_kwargs_from_env(n)[0]
            raise _Stop
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["rmeeto_shape"] = tuple(out.shape)
        elif isinstance(out, (int, float, bool)) and not isinstance(out, torch.Tensor):
            n.meta["rmeeto_value"] = out
        elif isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
            n.meta["rmeeto_shape"] = [tuple(o.shape) for o in out]
        return out


def first_block_input(gm: fx.GraphModule, calls: BlockCalls, example: torch.Tensor) -> torch.Tensor:
    rec = _Recorder(gm, stop_at=calls.nodes[0])
    try:
        rec.run(example)
    except _Stop:
        pass
    if rec.stopped_args is None:
        raise RmeetoError("the forward never reached the first block on the example input")
    hidden = rec.stopped_args[0]
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise RmeetoError(f"the first block receives {shape}, not a token sequence (batch, tokens, dim): "
                          "rmeeto merges token sequences")
    return hidden


def probe(gm: fx.GraphModule, calls: BlockCalls, example: torch.Tensor, hints: Hints) -> dict:
    """Run ``gm`` on ``example`` (recording shapes) and find the token count, width, output
    width and class-token positions. Returns a dict of those."""
    with torch.no_grad():
        out = _Recorder(gm).run(example)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise RmeetoError(f"the model returns {shape}, not (batch, classes) logits: convert the classifier in eval mode")
        base = first_block_input(gm, calls, example)
        _, tokens, dim = base.shape
        positions, param = _class_tokens(gm, calls, example, base, hints)
    return {"num_tokens": tokens, "embed_dim": dim, "num_classes": out.shape[-1], "cls_positions": positions,
            "cls_param": param}


def _class_tokens(gm, calls, example, base, hints) -> tuple[list[int], str | None]:
    dim = base.shape[-1]
    named = dict(gm.named_parameters())
    named.update({k: v for k, v in gm.named_buffers() if v.is_floating_point()})
    if hints.cls_param is not None:
        if hints.cls_param not in named:
            raise RmeetoError(f"hints['cls_param'] = {hints.cls_param!r} is not a parameter the forward uses "
                              f"(parameters of width {dim}: {', '.join(_rows_of(named, dim)) or 'none'})")
        candidates = [hints.cls_param]
    else:
        candidates = _rows_of(named, dim)
    positions, params = [], []
    for name in candidates:
        p = named[name]
        moved = _moved_positions(gm, calls, example, base, p)
        rows = min(2, p.numel() // dim)  # a class-token parameter fills one or two positions
        if hints.cls_param is not None and not 1 <= len(moved) <= rows:
            raise RmeetoError(f"changing {name} moves {len(moved)} positions of the first block's input, not one or two: "
                              "it is not a class token")
        if 1 <= len(moved) <= rows:
            positions += moved
            params.append(name)
    positions = sorted(set(positions))
    if len(positions) > 2:
        raise RmeetoError(f"found {len(positions)} class-token positions ({positions}) from {', '.join(params)}: "
                          "rmeeto protects one or two; name the class token with hints={'cls_param': '<name>'}")
    return positions, ",".join(params) or None


def _rows_of(named: dict, dim: int) -> list[str]:
    """Parameters that could be class tokens: one or two rows of width ``dim``."""
    return [k for k, v in named.items() if v.dim() >= 1 and v.shape[-1] == dim and v.numel() in (dim, 2 * dim)]


def _moved_positions(gm, calls, example, base, p: torch.Tensor) -> list[int]:
    saved = p.detach().clone()
    try:
        with torch.no_grad():
            p.add_(1.0)
            moved = first_block_input(gm, calls, example)
    finally:
        with torch.no_grad():
            p.copy_(saved)
    if moved.shape != base.shape:
        return []
    diff = (moved.float() - base.float()).abs().amax(dim=(0, 2))
    return [int(i) for i in torch.nonzero(diff > 0).flatten()]


# --------------------------------------------------------------------------------------------
# 4. the readout


@dataclass
class Readout:
    """A node that removes the token axis: ``kind`` ``"token"`` (``x[:, i]``, ``position`` = i)
    or ``"mean"`` (``x.mean(1)``)."""

    node: fx.Node
    kind: str
    position: int | None = None
    extra: dict = field(default_factory=dict)


def find_readouts(gm: fx.GraphModule, calls: BlockCalls, num_tokens: int) -> list[Readout]:
    """Follow the token tensors (shape ``(b, num_tokens, ...)``) from the last block's outputs to
    the nodes that consume them without producing one. Needs :func:`probe`'s shapes."""

    def tokens_out(n: fx.Node) -> bool:
        s = n.meta.get("rmeeto_shape")
        return isinstance(s, tuple) and len(s) == 3 and s[1] == num_tokens

    seen, frontier, found = set(), calls.outputs(len(calls.nodes) - 1), []
    while frontier:
        n = frontier.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output":
                raise RmeetoError("the model returns the token sequence itself: rmeeto converts classifiers that read "
                                  "a class token or the mean over tokens")
            if tokens_out(user):
                frontier.append(user)
            elif not _is_shape_query(user):
                found.append(_classify(user, n, num_tokens))
    if not found:
        raise RmeetoError("found no readout after the last block (x[:, i] or x.mean(1)): is this a classifier?")
    return found


def _is_shape_query(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target is getattr) or (n.op == "call_method" and n.target in ("size", "dim"))


def _classify(user: fx.Node, src: fx.Node, num_tokens: int) -> Readout:
    if user.op == "call_function" and user.target is operator.getitem and user.args[0] is src:
        idx = user.args[1]
        if isinstance(idx, tuple) and len(idx) >= 2 and idx[0] == slice(None):
            pos = idx[1]
            value = pos.meta.get("rmeeto_value") if isinstance(pos, fx.Node) else pos
            if isinstance(value, int) and not isinstance(value, bool):
                return Readout(user, "token", value % num_tokens)
    if _is_token_mean(user, src):
        return Readout(user, "mean")
    raise RmeetoError(
        f"cannot recognise the readout {user.format_node()}: rmeeto rewrites class-token readouts x[:, i] and the "
        "mean over tokens x.mean(1)"
    )


def _is_token_mean(n: fx.Node, src: fx.Node) -> bool:
    if n.op == "call_method" and n.target == "mean":
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    elif n.op == "call_function" and n.target is torch.mean:
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    else:
        return False
    keep = n.kwargs.get("keepdim", False)
    return n.args[0] is src and dims in (1, (1,), [1], -2, (-2,)) and not keep
