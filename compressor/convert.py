"""``convert(model, recipe)``: a zoo model → a merged ``torch.fx.GraphModule``, and the
compressed checkpoint format (arch + recipe + weights; rebuilt by re-running the converter,
never by unpickling code)."""

from __future__ import annotations

import copy
import os

import torch.fx as fx

from ._io import atomic_torch_save
from .errors import CheckpointError, RecipeError, RmeetoError
from .fx import guard_input, insert_merges, rewrite_readout, trace
from .merge.schedule import MergeConfig, merge_schedule
from .models.config import VimConfig
from .models.vim import VisionMamba

FORMAT_VERSION = 1

__all__ = ["convert", "save_compressed", "load_compressed_payload", "FORMAT_VERSION"]


def _as_recipe(recipe):
    from .recipes import Recipe, load_recipe

    if isinstance(recipe, str):
        return load_recipe(recipe)
    if isinstance(recipe, MergeConfig):
        return Recipe(name="custom", description="", merge=recipe)
    if isinstance(recipe, Recipe):
        return recipe
    raise RmeetoError(f"recipe must be a name, a path, a Recipe or a MergeConfig, got {type(recipe).__name__}")


def convert(model: VisionMamba, recipe) -> fx.GraphModule:
    """Trace ``model`` with torch.fx (blocks as leaves), insert the recipe's merges, rewrite the
    readout. Token counts are fixed by ``model.cfg.img_size``: to run another image size,
    convert a model built for that size. A recipe that merges nothing gives a graph that
    computes bit-exactly what ``model`` computes. The returned module holds a copy of the
    weights (several recipes can be converted from one model and cast or trained independently)."""
    if not isinstance(model, VisionMamba):
        raise RmeetoError(f"convert expects a VisionMamba (from create_model or load_model), got {type(model).__name__}")
    recipe = _as_recipe(recipe)
    cfg = model.cfg
    _check_layers(recipe, cfg.depth)
    steps = merge_schedule(recipe.merge, cfg.num_tokens, cfg.cls_index, cfg.depth)
    gm = trace(copy.deepcopy(model))  # the result owns its weights: training or casting it leaves ``model`` alone
    guard_input(gm, cfg.in_chans, cfg.img_size)
    size = insert_merges(gm, steps, recipe.merge)
    rewrite_readout(gm, steps[-1].cls_out if steps else cfg.cls_index, size)
    gm.graph.lint()
    gm.recompile()
    gm.cfg, gm.recipe, gm.steps = cfg, recipe, steps
    gm.train(model.training)
    return gm


def _check_layers(recipe, depth: int) -> None:
    """Explicit merge layers must exist (``merge_layers`` would silently skip the others)."""
    bad = [i for i in recipe.merge.layers if i >= depth]
    if bad:
        raise RecipeError(
            f"recipe {recipe.name}: [merge] layers lists layer {bad[0]} but the model has {depth} layers "
            f"(0-{depth - 1}): remove it or use a deeper model"
        )


def save_compressed(module: fx.GraphModule, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write a converted model atomically: ``{rmeeto_format, arch, recipe, state_dict, extra}``."""
    from .recipes import recipe_to_dict

    if not hasattr(module, "recipe") or not hasattr(module, "cfg"):
        raise RmeetoError("save_compressed expects a module returned by compressor.convert")
    payload = {
        "rmeeto_format": FORMAT_VERSION,
        "arch": module.cfg.to_dict(),
        "recipe": recipe_to_dict(module.recipe),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "extra": extra or {},
    }
    atomic_torch_save(payload, path)


def load_compressed_payload(obj: dict, backend: str = "auto", family: str | None = None, ema: bool = False, **overrides) -> fx.GraphModule:
    """Rebuild a converted model from the dict :func:`save_compressed` wrote (eval mode).

    ``family`` is accepted for :func:`~compressor.models.load_model`'s sake and ignored: the stored
    arch says it. A compressed file holds one set of weights, so ``ema=True`` is an error."""
    from .models.vim import set_backend
    from .recipes import recipe_from_dict

    if ema:
        raise CheckpointError("a compressed checkpoint holds one set of weights (no model_ema): drop --ema / ema=True")
    version = obj.get("rmeeto_format")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"compressed checkpoint format {version} is not supported by this rmeeto (reads {FORMAT_VERSION}): upgrade rmeeto")
    try:
        cfg = VimConfig.from_dict({**obj["arch"], **overrides})
        recipe = recipe_from_dict(obj["recipe"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"compressed checkpoint has a bad arch/recipe entry ({e}): re-create it with `rmeeto compress`") from None
    gm = convert(VisionMamba(cfg), recipe)
    try:
        gm.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0:2]
        raise CheckpointError(f"compressed checkpoint weights do not fit its arch ({' '.join(first)}): re-create it") from None
    gm.extra = obj.get("extra", {})
    return set_backend(gm.eval(), backend)
