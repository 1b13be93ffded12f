"""The one loading entry of the package: a file → the model it holds.

- an official Vim/VideoMamba checkpoint → rmeeto's :class:`~compressor.models.VisionMamba`
  (:mod:`compressor.models`, architecture read off the shapes);
- an official checkpoint with a model factory → the user's own model class with those weights
  (for post-hoc conversion of models rmeeto did not write);
- an rmeeto compressed file → a :class:`~compressor.convert.ConvertedModel`
  (:mod:`compressor.convert`; a foreign one is rebuilt only through a factory the caller names).

Every file is read with ``weights_only=True`` and an allow-list: nothing in a file runs code.
"""

from __future__ import annotations

import os

import torch.nn as nn

from .convert import FactoryRef, load_compressed_payload, stored_source
from .errors import CheckpointError
from .models.checkpoint import RESAVE_HINT, describe_checkpoint, extract_state_dict, load_official, read_checkpoint

__all__ = ["load_model", "load_converted", "load_foreign", "describe", "as_factory"]


def as_factory(factory, kwargs=None) -> FactoryRef | None:
    """``None``, a :class:`FactoryRef`, or ``"pkg.module:callable"`` (+ kwargs as a dict or JSON)."""
    if factory is None or isinstance(factory, FactoryRef):
        return factory
    return FactoryRef.parse(factory, kwargs)


def load_model(path: str | os.PathLike, family: str = "vim", ema: bool = False, backend: str = "auto",
               factory=None, factory_kwargs=None, **overrides) -> nn.Module:
    """The model in ``path`` in eval mode (see the module docstring). ``family`` and
    ``overrides`` apply to official checkpoints read into rmeeto's model; ``factory``
    (``"pkg.module:callable"`` or a :class:`FactoryRef`, with ``factory_kwargs``) builds the
    user's model class instead, and is required to rebuild a compressed foreign model."""
    factory = as_factory(factory, factory_kwargs)
    obj = read_checkpoint(path)
    if "rmeeto_format" in obj:
        return load_compressed_payload(obj, backend=backend, ema=ema, factory=factory, **overrides)
    if factory is not None:
        return load_foreign(obj, path, factory, ema=ema)
    return load_official(path, family=family, ema=ema, backend=backend, obj=obj, **overrides)


def load_converted(path: str | os.PathLike, family: str = "vim", ema: bool = False, backend: str = "auto",
                   factory=None, factory_kwargs=None):
    """:func:`load_model`, as a :class:`~compressor.convert.ConvertedModel` in every case: an
    unmerged model is converted with the recipe ``none`` (bit-exact), so callers read the token
    layout, input size and classes the same way for every kind of file."""
    from .convert import ConvertedModel, convert

    factory = as_factory(factory, factory_kwargs)
    model = load_model(path, family=family, ema=ema, backend=backend, factory=factory)
    return model if isinstance(model, ConvertedModel) else convert(model, "none", factory=factory)


def load_foreign(obj: dict, path, factory: FactoryRef, ema: bool = False) -> nn.Module:
    """The user's model (``factory``) with the weights of the checkpoint contents ``obj``."""
    sd, _ = extract_state_dict(obj, ema=ema)
    model = factory.build()
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise CheckpointError(f"the weights of {path} do not fit the model {factory.target} builds "
                              f"({lines[1] if len(lines) > 1 else lines[0]}); check --model-kwargs, or {RESAVE_HINT}") from None
    return model.eval()


def describe(path: str | os.PathLike, family: str | None = None, ema: bool = False, factory=None,
             factory_kwargs=None) -> dict:
    """What ``rmeeto info`` shows: for official files the architecture read off the shapes; for
    compressed files what they were made from; with a factory what the converter finds."""
    factory = as_factory(factory, factory_kwargs)
    obj = read_checkpoint(path)
    base = {"path": str(path), "top_level_keys": [str(k) for k in obj], "has_ema": isinstance(obj.get("model_ema"), dict)}
    if "rmeeto_format" in obj:
        source = stored_source(obj)
        model = load_compressed_payload(obj, factory=factory) if factory is not None or source.get("kind") == "zoo" else None
        return {**base, "rmeeto_format": obj["rmeeto_format"], "source": source, "recipe": obj.get("recipe", {}).get("name"),
                "layout": model.layout if model is not None else obj.get("layout"),
                "family": (source.get("arch") or {}).get("family") if source.get("kind") == "zoo" else "foreign",
                "steps": model.steps if model is not None else None, "extra": obj.get("extra", {}), "model": model}
    if factory is not None:
        from .convert import convert

        model = load_foreign(obj, path, factory, ema=ema)
        plain = convert(model, "none", factory=factory)
        return {**base, "rmeeto_format": None, "factory": factory, "layout": plain.layout, "family": "foreign",
                "parameters": sum(p.numel() for p in model.parameters()), "model": plain}
    return {**describe_checkpoint(path, family=family, ema=ema, obj=obj), "model": None}
