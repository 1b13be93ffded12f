"""``convert(model, recipe)``: a Vision Mamba → a :class:`ConvertedModel` with merge nodes, and
the compressed checkpoint format.

Two kinds of input, one set of graph passes:

- rmeeto's own :class:`~compressor.models.VisionMamba` (from ``create_model``/``load_model``):
  its structure is known from its config;
- any other ``nn.Module`` that is a Vision Mamba (the official hustvl/Vim or OpenGVLab
  VideoMamba classes, a user's own variant): its structure is discovered
  (:mod:`compressor.fx.discover`: block stack, token count, class-token position, readout).

Compressed files hold the recipe, the token layout, the weights and how to rebuild the model:
the zoo architecture, or for a foreign model a factory reference (``pkg.module:callable`` plus
JSON keyword arguments) that the user gave and must name again to load it. Nothing is unpickled.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from ._io import atomic_torch_save
from .errors import CheckpointError, RecipeError, RmeetoError
from .fx import (Hints, TokenLayout, find_block_calls, find_block_stack, find_readouts, foreign_functions, guard_input,
                 insert_merges, probe, rewrite_readouts, trace, zoo_readouts)
from .fx.discover import containers_of, token_frames_of
from .merge.schedule import MergeConfig, MergeStep, cls_positions, merge_schedule
from .models.config import VimConfig
from .models.vim import VisionMamba

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)

__all__ = ["convert", "unmerged", "ConvertedModel", "ConversionInfo", "FactoryRef", "save_compressed",
           "load_compressed_payload", "FORMAT_VERSION"]


@dataclass(frozen=True)
class FactoryRef:
    """How to build a foreign model: ``pkg.module:callable`` called with ``kwargs`` (JSON values)."""

    target: str
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, target: str, kwargs: str | dict | None = None) -> "FactoryRef":
        if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
            raise RmeetoError(f"model factory {target!r} is not of the form pkg.module:callable")
        if isinstance(kwargs, str):
            try:
                kwargs = json.loads(kwargs)
            except json.JSONDecodeError as e:
                raise RmeetoError(f"--model-kwargs is not valid JSON ({e.msg} at column {e.colno}): e.g. '{{\"depth\": 8}}'") from None
        kwargs = kwargs or {}
        if not isinstance(kwargs, dict):
            raise RmeetoError(f"model kwargs must be a JSON object, got {type(kwargs).__name__}")
        try:
            json.dumps(kwargs)
        except TypeError as e:
            raise RmeetoError(f"model kwargs must be JSON values (they are stored in the checkpoint): {e}") from None
        return cls(target, dict(kwargs))

    def build(self) -> nn.Module:
        """Import the module and call the factory (user code: only ever with the user's consent)."""
        mod_name, attr = self.target.split(":")
        try:
            obj = importlib.import_module(mod_name)
        except ImportError as e:
            raise RmeetoError(f"cannot import {mod_name} for model factory {self.target} ({e}): install it or put it on "
                              "PYTHONPATH") from None
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise RmeetoError(f"{mod_name} has no attribute {attr!r} (model factory {self.target})")
            obj = getattr(obj, part)
        if not callable(obj):
            raise RmeetoError(f"model factory {self.target} is not callable")
        try:
            model = obj(**self.kwargs)
        except TypeError as e:
            raise RmeetoError(f"model factory {self.target} rejected its arguments {self.kwargs} ({e})") from None
        if not isinstance(model, nn.Module):
            raise RmeetoError(f"model factory {self.target} returned a {type(model).__name__}, not an nn.Module")
        return model

    def to_dict(self) -> dict:
        return {"target": self.target, "kwargs": self.kwargs}


@dataclass(frozen=True)
class ConversionInfo:
    """What a converted model was built from: the recipe and its merge steps, the token layout,
    and the zoo config (rmeeto's own models) or the factory (foreign models, when known)."""

    recipe: object
    steps: tuple[MergeStep, ...]
    layout: TokenLayout
    cfg: VimConfig | None = None
    factory: FactoryRef | None = None
    hints: dict = field(default_factory=dict)

    @property
    def foreign(self) -> bool:
        return self.cfg is None


class ConvertedModel(fx.GraphModule):
    """A Vision Mamba with merge nodes (a ``torch.fx.GraphModule``). ``info`` (recipe, steps,
    layout, config or factory) and ``extra`` (what the compressed file recorded) survive
    ``copy.deepcopy``; ``cfg``, ``recipe``, ``steps`` and ``layout`` read ``info``."""

    def __init__(self, root: nn.Module, graph: fx.Graph, info: ConversionInfo, extra: dict | None = None):
        super().__init__(root, graph, class_name="ConvertedModel")
        self._preserve("info", info)
        self._preserve("extra", dict(extra or {}))

    def _preserve(self, name: str, value) -> None:
        """Set an attribute that ``GraphModule.__deepcopy__`` carries over (through ``meta``)."""
        self.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[name] = value
        setattr(self, name, value)

    def with_extra(self, **entries) -> "ConvertedModel":
        """Record more metadata (kept by ``save_compressed`` and deepcopy). Returns self."""
        self._preserve("extra", {**self.extra, **entries})
        return self

    def source(self) -> dict:
        """How this model is rebuilt: the zoo architecture, or a foreign model's factory and hints
        (None when neither is known), with the token layout. Stored in compressed files and
        compared on resume."""
        info = self.info
        if info.cfg is not None:
            source = {"kind": "zoo", "arch": info.cfg.to_dict()}
        elif info.factory is not None:
            source = {"kind": "factory", **info.factory.to_dict(), "hints": info.hints}
        else:
            source = {"kind": "object", "hints": info.hints}
        return source

    @property
    def cfg(self) -> VimConfig | None:
        return self.info.cfg

    @property
    def recipe(self):
        return self.info.recipe

    @property
    def steps(self) -> list[MergeStep]:
        return list(self.info.steps)

    @property
    def layout(self) -> TokenLayout:
        return self.info.layout


def _as_recipe(recipe):
    from .recipes import Recipe, load_recipe

    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe)
    if isinstance(recipe, MergeConfig):
        return Recipe(name="custom", description="", merge=recipe)
    if isinstance(recipe, Recipe):
        return recipe
    raise RmeetoError(f"recipe must be a name, a path, a Recipe or a MergeConfig, got {type(recipe).__name__}")


def convert(model: nn.Module, recipe, *, example_input: torch.Tensor | None = None, hints: dict | None = None,
            factory: FactoryRef | None = None) -> ConvertedModel:
    """Trace ``model`` with torch.fx (blocks as leaves), insert the recipe's merges, rewrite the
    readout's use of the class-token index. A recipe that merges nothing gives a graph that
    computes bit-exactly what ``model`` computes. The result owns a copy of the weights; ``model``
    is left untouched.

    ``model``: rmeeto's :class:`~compressor.models.VisionMamba`, or any Vision Mamba module (see
    :mod:`compressor.fx.discover` for the contract). For foreign models ``example_input`` (one
    batch of images; default: read the size off the model's ``img_size`` and first convolution)
    fixes the token counts and is used to probe the structure; ``hints`` help discovery
    (``blocks``, ``cls_param``, ``leaves``, ``leaf_functions``); ``factory`` records how to rebuild
    the model when it is saved.
    """
    recipe = _as_recipe(recipe)
    if isinstance(model, ConvertedModel):
        raise RmeetoError(f"the model is already converted (recipe {model.recipe.name}): convert the original model")
    if isinstance(model, VisionMamba):
        return _convert_zoo(model, recipe)
    if not isinstance(model, nn.Module):
        raise RmeetoError(f"convert expects an nn.Module (a Vision Mamba), got {type(model).__name__}")
    return _convert_foreign(model, recipe, example_input, Hints.of(hints), factory)


def _convert_zoo(model: VisionMamba, recipe) -> ConvertedModel:
    cfg = model.cfg
    layout = TokenLayout(
        num_tokens=cfg.num_tokens, embed_dim=cfg.embed_dim, depth=cfg.depth, cls_index=cfg.cls_index,
        input_shape=cfg.input_shape, num_classes=cfg.num_classes, token_frames=cfg.token_frames,
        readout="mean" if cfg.cls_index is None else "token", cls_param=None if cfg.cls_index is None else "cls_token",
    )
    gm = trace(copy.deepcopy(model))  # the result owns its weights: training or casting it leaves ``model`` alone
    calls = find_block_calls(gm, [f"layers.{i}" for i in range(cfg.depth)])
    return _finish(gm, calls, zoo_readouts(gm), layout, recipe, cfg=cfg, training=model.training)


def _convert_foreign(model: nn.Module, recipe, example, hints: Hints, factory) -> ConvertedModel:
    container, blocks, others = find_block_stack(model, hints)
    work = copy.deepcopy(model)
    containers = containers_of(container)
    functions, packages = foreign_functions([work.get_submodule(c) for c in containers], type(model).__module__)
    gm = trace(work, containers=containers, leaves=tuple(hints.leaves), autowrap=[*functions, *hints.leaf_functions],
               autowrap_modules=packages)
    calls = find_block_calls(gm, blocks, others)
    example = _example_input(model, example)
    was_training = model.training
    facts = probe(gm.eval(), calls, example, hints)
    readouts = find_readouts(gm, calls, facts["num_tokens"])
    cls = _class_token(facts["cls_positions"], readouts)
    kinds = {r.kind for r in readouts}
    layout = TokenLayout(
        num_tokens=facts["num_tokens"], embed_dim=facts["embed_dim"], depth=len(blocks), cls_index=cls,
        input_shape=tuple(example.shape[1:]), num_classes=facts["num_classes"], blocks=container,
        block_call=calls.style, readout="token" if kinds == {"token"} else "mean", cls_param=facts["cls_param"],
        token_frames=token_frames_of(tuple(example.shape[1:]), facts["num_tokens"], cls),
    )
    out = _finish(gm, calls, readouts, layout, recipe, factory=factory, hints=hints.to_dict(), training=was_training)
    _check_runs(out, example)
    return out


def _class_token(positions: list[int], readouts) -> int | tuple[int, int] | None:
    """The protected positions: the class token(s) the readout reads (or that a mean readout
    leaves in the sequence): one index, or a tuple of two (hustvl/Vim's head and tail tokens)."""
    read = sorted({r.position for r in readouts if r.kind == "token"})
    bad = [p for p in read if p not in positions]
    if bad:
        found = f"class tokens at {positions}" if positions else "no class-token parameter"
        raise RmeetoError(
            f"the readout reads token {bad[0]}, which is not a class token ({found}): merging would move whatever "
            "token sits there; if it is a class token, name its parameter with hints={'cls_param': '<name>'}"
        )
    if len(positions) > 1:
        return tuple(sorted(positions))
    return positions[0] if positions else None


def _example_input(model: nn.Module, example) -> torch.Tensor:
    """The probe input on the model's device and dtype (given, or built from ``img_size`` and
    the first convolution's input channels; a 3-d patch convolution takes clips, whose frames come
    from :func:`_frames_of`)."""
    p = next(iter(model.parameters()), None)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    if example is not None:
        if not isinstance(example, torch.Tensor):
            raise RmeetoError(f"example_input must be a tensor (one batch of images), got {type(example).__name__}")
        return example.to(device=device, dtype=dtype if example.is_floating_point() else example.dtype)
    conv = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
    size = next((getattr(m, "img_size") for m in model.modules() if isinstance(getattr(m, "img_size", None), (int, tuple, list))), None)
    frames = _frames_of(model, conv) if isinstance(conv, nn.Conv3d) else ()
    if conv is None or size is None or frames is None:
        shape = "1, 3, T, H, W" if isinstance(conv, nn.Conv3d) else "1, 3, H, W"
        what = "frames (no num_frames attribute or temporal embedding)" if size is not None else "size (no img_size attribute)"
        raise RmeetoError(f"cannot tell the input {what} of {type(model).__name__}: pass example_input=torch.randn({shape})")
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, conv.in_channels, *frames, h, w, generator=gen).to(device=device, dtype=dtype)


_FRAME_ATTRS = ("num_frames", "all_frames", "frames")


def _frames_of(model: nn.Module, conv: nn.Conv3d) -> tuple[int] | None:
    """``(T,)`` for a video model: an int ``num_frames``-like attribute, else a temporal position
    embedding's rows (``(1, T / tubelet, d)``) times the patch kernel's depth (the tubelet), as
    VideoMamba's video class holds it. None when neither is there."""
    for m in model.modules():
        for name in _FRAME_ATTRS:
            value = getattr(m, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return (value,)
    for name, p in model.named_parameters():
        if "temporal" in name.rsplit(".", 1)[-1] and p.dim() == 3 and p.shape[0] == 1:
            return (p.shape[1] * conv.kernel_size[0],)
    return None


def _finish(gm: fx.GraphModule, calls, readouts, layout: TokenLayout, recipe, *, cfg=None, factory=None, hints=None,
            training=False) -> ConvertedModel:
    _check_layers(recipe, layout.depth)
    steps = merge_schedule(recipe.merge, layout.num_tokens, layout.cls_index, layout.depth)
    guard_input(gm, layout.input_shape)
    size = insert_merges(gm, calls, steps, recipe.merge)
    final = steps[-1].cls_out if steps else layout.cls_index
    rewrite_readouts(gm, readouts, dict(zip(cls_positions(layout.cls_index), cls_positions(final))), size)
    gm.graph.lint()
    info = ConversionInfo(recipe, tuple(steps), layout, cfg=cfg, factory=factory, hints=hints or {})
    out = ConvertedModel(gm, gm.graph, info)
    return out.train(training)


def _check_runs(gm: ConvertedModel, example: torch.Tensor) -> None:
    """Foreign blocks may not accept fewer tokens (e.g. a fixed-length positional table inside a
    block): find out now, with one line, rather than in the user's first batch."""
    mode = gm.training
    try:
        with torch.no_grad():
            gm.eval()(example)
    except Exception as e:  # noqa: BLE001 -- the user's code can raise anything
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RmeetoError(f"the converted model fails on the example input ({type(e).__name__}: {msg}): its blocks may "
                          "not accept a changing token count") from None
    finally:
        gm.train(mode)


def _check_layers(recipe, depth: int) -> None:
    """Explicit merge layers must exist (``merge_layers`` would silently skip the others)."""
    bad = [i for i in recipe.merge.explicit_layers() if i >= depth]
    if bad:
        key = "schedule" if recipe.merge.per_layer else "layers"
        raise RecipeError(
            f"recipe {recipe.name}: [merge] {key} lists layer {bad[0]} but the model has {depth} layers "
            f"(0-{depth - 1}): remove it or use a deeper model"
        )


def unmerged(gm: ConvertedModel) -> nn.Module:
    """The plain model (no merges) with ``gm``'s weights (merges carry none): the baseline of a
    compressed model. rmeeto's models are rebuilt from their config, foreign ones through their
    factory; the converted graph keeps the original parameter names, so the weights go back in
    by name."""
    info = gm.info
    if info.cfg is not None:
        plain = VisionMamba(info.cfg)
    elif info.factory is not None:
        plain = info.factory.build()
    else:
        raise RmeetoError("cannot rebuild the unmerged model: this converted model has no factory (convert it with "
                          "factory=... / --model-factory)")
    missing, unexpected = plain.load_state_dict(gm.state_dict(), strict=False)
    missing = missing if info.cfg is not None else []  # a foreign model may hold weights its forward never uses
    if unexpected or missing:
        bad = (unexpected or missing)[0]
        raise RmeetoError(f"cannot load the merged model's weights into the unmerged one ({bad!r} does not match)")
    return plain.eval()


# --------------------------------------------------------------------------------------------
# the compressed file


def save_compressed(module: ConvertedModel, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write a converted model atomically: ``{rmeeto_format, source, layout, recipe, state_dict, extra}``.
    ``source`` is the zoo architecture, or the factory a foreign model is rebuilt with."""
    from .recipes import recipe_to_dict

    if not isinstance(module, ConvertedModel):
        raise RmeetoError("save_compressed expects a module returned by compressor.convert")
    info, source = module.info, module.source()
    if source["kind"] == "object":
        raise RmeetoError("this converted model was built from a model object and no factory: pass factory=FactoryRef.parse("
                          "'pkg.module:callable', kwargs) to convert (CLI: --model-factory), so that it can be rebuilt")
    payload = {
        "rmeeto_format": FORMAT_VERSION,
        "source": source,
        "layout": info.layout.to_dict(),
        "recipe": recipe_to_dict(info.recipe),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "extra": {**module.extra, **(extra or {})},
    }
    atomic_torch_save(payload, path)


def stored_source(obj: dict) -> dict:
    """The ``source`` entry of a compressed file (format 1 files hold only a zoo ``arch``)."""
    return obj.get("source") or {"kind": "zoo", "arch": obj.get("arch")}


def load_compressed_payload(obj: dict, backend: str = "auto", family: str | None = None, ema: bool = False,
                            factory: FactoryRef | None = None, **overrides) -> ConvertedModel:
    """Rebuild a converted model from the dict :func:`save_compressed` wrote (eval mode).

    ``family`` is accepted for :func:`~compressor.loading.load_model`'s sake and ignored: the stored
    source says it. A compressed file holds one set of weights, so ``ema=True`` is an error. A
    foreign model is rebuilt only through a ``factory`` the caller names (the stored one is shown
    in the error otherwise): importing and calling code named by a file needs the user's consent."""
    from .models.vim import set_backend
    from .recipes import recipe_from_dict

    if ema:
        raise CheckpointError("a compressed checkpoint holds one set of weights (no model_ema): drop --ema / ema=True")
    version = obj.get("rmeeto_format")
    if version not in READABLE_FORMATS:
        raise CheckpointError(f"compressed checkpoint format {version} is not supported by this rmeeto (reads "
                              f"{', '.join(map(str, READABLE_FORMATS))}): upgrade rmeeto")
    source = stored_source(obj)
    try:
        recipe = recipe_from_dict(obj["recipe"])
        if source.get("kind") == "zoo":
            model = VisionMamba(VimConfig.from_dict({**source["arch"], **overrides}))
            gm = convert(model, recipe)
        elif source.get("kind") == "factory":
            gm = _rebuild_foreign(source, obj, recipe, factory)
        else:
            raise KeyError(f"source kind {source.get('kind')!r}")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"compressed checkpoint has a bad source/recipe entry ({e}): re-create it with `rmeeto compress`") from None
    try:
        gm.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0:2]
        raise CheckpointError(f"compressed checkpoint weights do not fit its model ({' '.join(first)}): re-create it") from None
    gm.with_extra(**obj.get("extra", {}))
    return set_backend(gm.eval(), backend)


def _rebuild_foreign(source: dict, obj: dict, recipe, factory: FactoryRef | None) -> ConvertedModel:
    stored = FactoryRef(source["target"], dict(source.get("kwargs") or {}))
    if factory is None:
        raise CheckpointError(
            f"this compressed model was converted from a model built by {stored.target}"
            f"{'(**' + json.dumps(stored.kwargs) + ')' if stored.kwargs else '()'}; rebuilding it runs that code: "
            f"pass --model-factory {stored.target} (Python: factory=FactoryRef.parse(...)) to confirm"
        )
    if factory.target == stored.target and not factory.kwargs:
        factory = replace(factory, kwargs=stored.kwargs)
    layout = TokenLayout.from_dict(obj["layout"])
    example = torch.randn(1, *layout.input_shape, generator=torch.Generator().manual_seed(0))
    model = factory.build().eval()
    gm = convert(model, recipe, example_input=example, hints=source.get("hints") or None, factory=factory)
    if gm.layout != layout:
        raise CheckpointError(f"{factory.target} builds a model with another token layout than the stored one "
                              f"({gm.layout} vs {layout}): pass the factory and kwargs the model was converted with")
    return gm
