"""A torch.fx tracer for Vision Mamba models, rmeeto's own and foreign ones.

Only the modules that *contain* the block stack are traced through (the root, and e.g. an
``encoder`` holding ``layers``); every other submodule is one ``call_module`` leaf: the blocks
themselves, the patch embedding (its shape asserts would stop a symbolic trace), norms, drop
paths (traced through, their ``if self.training`` would be decided once at trace time), heads.
Functions that the traced forwards import from other packages (``rms_norm_fn`` of mamba-ssm,
``einops.rearrange``) are recorded as single ``call_function`` nodes instead of being traced
into: they run unchanged at run time. The forward's extra arguments (``inference_params``,
``return_features``, ...) are fixed to their defaults and dropped from the graph's signature.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from typing import Iterable

import torch.fx as fx
import torch.nn as nn

from ..errors import RmeetoError, first_line

__all__ = ["MambaTracer", "trace", "foreign_functions"]

# packages whose functions fx traces through correctly (or that are not tensor code at all)
_TRACEABLE_PACKAGES = ("torch", "builtins", "math", "operator", "functools", "typing", "collections", "itertools",
                       "random", "warnings", "copy", "abc", "enum", "dataclasses", "inspect", "numbers")


class MambaTracer(fx.Tracer):
    """Traces through ``containers`` (qualified names; ``""`` is the root, always traced) and
    makes every other module a leaf, plus instances of ``leaves`` wherever they are."""

    def __init__(self, containers: Iterable[str] = (), leaves: tuple[type, ...] = ()):
        super().__init__()
        self.containers = set(containers)
        self.leaves = tuple(leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.leaves and isinstance(m, self.leaves):
            return True
        return qualname not in self.containers


def _leaf_call(fn):
    """``fn`` recorded as one ``call_function`` node when called with a Proxy, else called."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        proxies = []
        fx.node.map_aggregate((args, kwargs), lambda a: proxies.append(a) if isinstance(a, fx.Proxy) else None)
        if proxies:
            return proxies[0].tracer.create_proxy("call_function", fn, args, kwargs)
        return fn(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def _leaf_functions(namespaces: list[dict], functions: Iterable):
    """While tracing, the names that hold ``functions`` in ``namespaces`` (module globals)
    call :func:`_leaf_call` wrappers. (torch.fx's own autowrap skips names starting with ``_``
    and looks at the root's globals only.)"""
    wanted = {id(f) for f in functions}
    saved = []
    try:
        for ns in namespaces:
            for name, value in list(ns.items()):
                if id(value) in wanted:
                    saved.append((ns, name, value))
                    ns[name] = _leaf_call(value)
        yield
    finally:
        for ns, name, value in reversed(saved):
            ns[name] = value


def foreign_functions(modules: Iterable[nn.Module], home: str | None = None) -> tuple[list, list]:
    """``(functions, packages)`` that the ``forward`` of ``modules`` can see as globals and that
    come from another package than torch or the standard library: functions imported by name
    (``rms_norm_fn`` of mamba-ssm) and modules whose functions are called as attributes
    (``ops.fused_norm(...)``). Tracing into them would fail on proxies (Triton kernels,
    ``autograd.Function.apply``, checks on tensor values); as leaf functions they compute exactly
    what they compute eagerly. Functions of the model's own module (``home``) are traced through
    (they may call the blocks)."""
    functions, packages = {}, {}
    for m in modules:
        fn = getattr(type(m), "forward", None)
        for value in getattr(fn, "__globals__", {}).values():
            if isinstance(value, types.ModuleType):
                name = value.__name__
                if name.split(".")[0] not in _TRACEABLE_PACKAGES and name != home:
                    packages[id(value)] = value
                continue
            if not isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
                continue
            pkg = (getattr(value, "__module__", None) or "").split(".")[0]
            if not pkg or pkg in _TRACEABLE_PACKAGES or value.__module__ == home:
                continue
            functions[id(value)] = value
    return list(functions.values()), list(packages.values())


def _extra_args(model: nn.Module) -> dict:
    """The forward's parameters after the input, fixed to their defaults."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    fixed = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise RmeetoError(
                f"{type(model).__name__}.forward takes a second required argument {p.name!r}: rmeeto converts models "
                "called as model(images); wrap the model in a module whose forward takes the images only"
            )
        fixed[p.name] = p.default
    return fixed


def _drop_fixed_args(graph: fx.Graph, fixed: dict) -> None:
    """Remove the placeholders (and fx's specialisation asserts) of the fixed arguments: the
    converted model's forward takes the images only."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"][1:]
    doomed: list[fx.Node] = []
    frontier = list(placeholders)
    while frontier:  # the assert chains hang off the placeholders
        n = frontier.pop()
        if n in doomed:
            continue
        doomed.append(n)
        frontier.extend(n.users)
    for n in doomed:
        if n.op not in ("placeholder", "call_function"):
            raise RmeetoError(f"the forward uses its fixed argument in {n.format_node()}: cannot drop it")
    for n in reversed(_topological(graph, doomed)):
        graph.erase_node(n)


def _topological(graph: fx.Graph, nodes: list[fx.Node]) -> list[fx.Node]:
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(nodes, key=order.__getitem__)


def trace(model: nn.Module, *, containers: Iterable[str] = ("",), leaves: tuple[type, ...] = (), autowrap: Iterable = (),
          autowrap_modules: Iterable[types.ModuleType] = (), class_name: str | None = None) -> fx.GraphModule:
    """Trace ``model(images)`` (see the module docstring); extra forward arguments take their
    defaults. ``autowrap``: functions kept whole wherever the traced forwards see them;
    ``autowrap_modules``: packages whose functions are kept whole. Raises :class:`RmeetoError`
    with one line when the forward cannot be traced."""
    fixed = _extra_args(model)
    tracer = MambaTracer(containers, leaves)
    traced = [model.get_submodule(c) for c in containers]
    namespaces = [vars(m) for m in autowrap_modules] + [getattr(type(m).forward, "__globals__", {}) for m in traced]
    functions = list(autowrap) + [v for m in autowrap_modules for k, v in vars(m).items()
                                  if not k.startswith("__") and isinstance(v, (types.FunctionType, types.BuiltinFunctionType))]
    try:
        with _leaf_functions(namespaces, functions):
            graph = tracer.trace(model, concrete_args=fixed or None)
    except Exception as e:  # noqa: BLE001 -- any trace failure becomes one line naming where
        raise RmeetoError(_trace_failure(model, e)) from None
    if fixed:
        _drop_fixed_args(graph, fixed)
    graph.lint()
    return fx.GraphModule(tracer.root, graph, class_name=class_name or f"{type(model).__name__}Graph")


def _trace_failure(model: nn.Module, e: Exception) -> str:
    where = ""
    tb = e.__traceback__
    while tb is not None:  # the innermost frame of the user's code
        code = tb.tb_frame.f_code
        if "torch/fx" not in code.co_filename and "/compressor/" not in code.co_filename:
            where = f" at {code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} ({code.co_name})"
        tb = tb.tb_next
    msg = first_line(e, limit=200)
    return (
        f"cannot trace {type(model).__name__}.forward with torch.fx{where}: {msg}; rmeeto traces only the modules "
        "that hold the blocks: move data-dependent code into a submodule, or name it in hints={'leaves': [...]} "
        "(module classes) / hints={'leaf_functions': [...]}"
    )
