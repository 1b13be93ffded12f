"""Recipes: what to merge and how to re-train, as frozen dataclasses loaded from TOML.

A recipe file has three parts::

    name = "r031"                 # defaults to the file name (built-ins must match it)
    description = "..."
    version = 1                   # recipe format version (this rmeeto reads 1)
    [merge]                       # MergeConfig fields (compressor.merge.schedule)
    num_prune = 11
    [retrain]                     # RetrainConfig fields; only what differs from the defaults
    epochs = 15

Built-in recipes are the ``*.toml`` files of ``compressor/builtin_recipes/`` (package data: they
ship in the wheel); :func:`load_recipe` takes a built-in name or a path to a ``.toml`` file.

Precedence, resolved here and nowhere else: **command line > recipe file > dataclass default**.

- a key missing from a recipe file takes the default of :class:`RetrainConfig` /
  :class:`~compressor.merge.schedule.MergeConfig`;
- :func:`with_overrides` replaces fields with the keyword arguments that are not ``None`` (CLI
  options default to ``None``, so an option that was not given keeps the recipe's value).

Every problem is a :class:`~compressor.errors.RecipeError` whose one-line message names the file
(or ``overrides`` / the dict's source) and the key, e.g.
``recipes/foo.toml: [merge] num_prune must be an integer >= 0, got "x"``.

:func:`recipe_to_dict` gives plain ``dict``/``list``/``str``/``int``/``float``/``bool`` values (safe
for ``torch.load(weights_only=True)`` and JSON), and :func:`recipe_from_dict` rebuilds the exact
same :class:`Recipe`: the resolved recipe is stored in every checkpoint.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from .errors import RecipeError
from .merge.schedule import DISTANCES, METRICS, MODES, MergeConfig

__all__ = [
    "RECIPE_FORMAT_VERSION",
    "AMP_MODES",
    "RetrainConfig",
    "Recipe",
    "load_recipe",
    "list_recipes",
    "list_recipe_names",
    "recipe_to_dict",
    "recipe_from_dict",
    "with_overrides",
]

RECIPE_FORMAT_VERSION = 1
AMP_MODES = ("auto", "bf16", "fp16", "off")
RECIPES_DIR = Path(__file__).resolve().parent / "builtin_recipes"  # package data (pyproject.toml)


@dataclass(frozen=True)
class RetrainConfig:
    """The ``[retrain]`` table: the paper's re-training recipe (docs/recipes.md).

    ``lr`` is the base learning rate for a global batch of 512, scaled linearly by
    ``batch_size * world_size / 512``; ``batch_size`` is per process. ``auto_augment = ""``
    turns RandAugment off, ``clip_grad = 0`` turns clipping off, ``mixup``/``cutmix`` 0 turn
    them off. ``amp``: ``auto`` (bf16 where supported, else fp16 on CUDA, off on CPU), ``bf16``,
    ``fp16`` or ``off``. ``eval_crop_pct`` 0.875 = center crop 224 from a 256 resize.
    """

    epochs: int = 3
    lr: float = 2e-5
    min_lr: float = 1e-6
    warmup_epochs: int = 0
    weight_decay: float = 0.05
    batch_size: int = 128
    distill: bool = True
    distill_weight: float = 0.5
    distill_temperature: float = 1.0
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    drop_path: float = 0.1
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    reprob: float = 0.25
    ema: bool = False
    ema_decay: float = 0.99996
    amp: str = "auto"
    seed: int = 0
    clip_grad: float = 0.0
    num_workers: int = 8
    eval_crop_pct: float = 0.875
    crop_scale_min: float = 0.08  # RandomResizedCrop scale range (min, 1); DeiT/timm default


@dataclass(frozen=True)
class Recipe:
    """A named, versioned recipe: the merge schedule and the re-training settings."""

    name: str
    description: str = ""
    version: int = RECIPE_FORMAT_VERSION
    merge: MergeConfig = field(default_factory=MergeConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)


# --------------------------------------------------------------------------------------------
# validation rules: (kind, predicate on the converted value, what the value must be)


@dataclass(frozen=True)
class _Rule:
    kind: str  # "int" | "float" | "bool" | "str" | "ints"
    ok: Callable[[Any], bool]
    must: str


def _int(lo: int) -> _Rule:
    return _Rule("int", lambda v: v >= lo, f"an integer >= {lo}")


def _float(ok: Callable[[float], bool], must: str) -> _Rule:
    return _Rule("float", lambda v: math.isfinite(v) and ok(v), must)


def _choice(choices: tuple[str, ...]) -> _Rule:
    return _Rule("str", lambda v: v in choices, "one of " + ", ".join(f'"{c}"' for c in choices))


_BOOL = _Rule("bool", lambda v: True, "true or false")
_STR = _Rule("str", lambda v: True, "a string")
_NONNEG = _float(lambda v: v >= 0, "a number >= 0")
_POS = _float(lambda v: v > 0, "a number > 0")
_UNIT = _float(lambda v: 0 <= v < 1, "a number in [0, 1)")

_MERGE_RULES: dict[str, _Rule] = {
    "mode": _choice(MODES),
    "num_prune": _int(0),
    "interval": _int(1),
    "odd": _BOOL,
    "layers": _Rule("ints", lambda v: all(i >= 1 for i in v), "a list of layer indices >= 1"),
    "final_tokens": _int(0),
    "ordered": _BOOL,
    "distance": _choice(DISTANCES),
    "metric": _choice(METRICS),
}

_RETRAIN_RULES: dict[str, _Rule] = {
    "epochs": _int(1),
    "lr": _POS,
    "min_lr": _NONNEG,
    "warmup_epochs": _int(0),
    "weight_decay": _NONNEG,
    "batch_size": _int(1),
    "distill": _BOOL,
    "distill_weight": _NONNEG,
    "distill_temperature": _POS,
    "smoothing": _UNIT,
    "mixup": _NONNEG,
    "cutmix": _NONNEG,
    "drop_path": _UNIT,
    "auto_augment": _STR,
    "color_jitter": _NONNEG,
    "reprob": _float(lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "ema": _BOOL,
    "ema_decay": _float(lambda v: 0 < v < 1, "a number in (0, 1)"),
    "amp": _choice(AMP_MODES),
    "seed": _int(0),
    "clip_grad": _NONNEG,
    "num_workers": _int(0),
    "eval_crop_pct": _float(lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "crop_scale_min": _float(lambda v: 0 < v <= 1, "a number in (0, 1]"),
}

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TOP_RULES: dict[str, _Rule] = {
    "name": _Rule(
        "str", lambda v: bool(_NAME_RE.fullmatch(v)), "letters, digits, '.', '_' or '-' (starting with a letter or digit)"
    ),
    "description": _STR,
    "version": _Rule(
        "int", lambda v: v == RECIPE_FORMAT_VERSION, f"{RECIPE_FORMAT_VERSION} (the recipe format this rmeeto reads)"
    ),
}
_SECTIONS = ("merge", "retrain")

assert set(_MERGE_RULES) == {f.name for f in fields(MergeConfig)}
assert set(_RETRAIN_RULES) == {f.name for f in fields(RetrainConfig)}
assert not set(_MERGE_RULES) & set(_RETRAIN_RULES)  # with_overrides relies on unique names


def _fmt(v: Any) -> str:
    """A value as it would be written in TOML, on one line, kept short."""
    if isinstance(v, bool):
        s = "true" if v else "false"
    elif isinstance(v, str):
        s = json.dumps(v, ensure_ascii=False)
    elif isinstance(v, (list, tuple)):
        s = "[" + ", ".join(_fmt(x) for x in v) + "]"
    elif isinstance(v, dict):
        s = "a table"
    else:
        s = repr(v)
    s = " ".join(s.split())
    return s if len(s) <= 60 else s[:57] + "..."


def _where(section: str | None, key: str) -> str:
    return f"[{section}] {key}" if section else key


def _convert(rule: _Rule, v: Any) -> tuple[bool, Any]:
    """Type check + normalisation (ints are accepted for floats, never bools for numbers)."""
    if rule.kind == "bool":
        return isinstance(v, bool), v
    if rule.kind == "str":
        return isinstance(v, str), v
    if rule.kind == "int":
        return isinstance(v, int) and not isinstance(v, bool), v
    if rule.kind == "float":
        good = isinstance(v, (int, float)) and not isinstance(v, bool)
        return good, float(v) if good else v
    if rule.kind == "ints":
        good = isinstance(v, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
        return good, tuple(v) if good else v
    raise AssertionError(rule.kind)


def _check(source: str, section: str | None, key: str, v: Any, rules: dict[str, _Rule]) -> Any:
    if key not in rules:
        near = difflib.get_close_matches(key, list(rules), n=1)
        hint = f'; did you mean "{near[0]}"?' if near else f"; known keys: {', '.join(rules)}"
        raise RecipeError(f'{source}: unknown key {_where(section, _fmt(key))}{hint}')
    rule = rules[key]
    good, v2 = _convert(rule, v)
    if not good or not rule.ok(v2):
        raise RecipeError(f"{source}: {_where(section, key)} must be {rule.must}, got {_fmt(v)}")
    return v2


def _section(source: str, section: str, table: Any, rules: dict[str, _Rule]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise RecipeError(f"{source}: [{section}] must be a table, got {_fmt(table)}")
    return {k: _check(source, section, k, v, rules) for k, v in table.items()}


def _build(d: dict[str, Any], source: str, default_name: str | None = None) -> Recipe:
    """Validate a parsed recipe (TOML document or :func:`recipe_to_dict` output)."""
    if not isinstance(d, dict):
        raise RecipeError(f"{source}: a recipe must be a table, got {_fmt(d)}")
    top: dict[str, Any] = {}
    for k, v in d.items():
        if k in _SECTIONS:
            continue
        top[k] = _check(source, None, k, v, _TOP_RULES)
    if "name" not in top:
        if default_name is None:
            raise RecipeError(f"{source}: name is missing")
        top["name"] = _check(source, None, "name", default_name, _TOP_RULES)
    merge_kw = _section(source, "merge", d.get("merge", {}), _MERGE_RULES)
    retrain_kw = _section(source, "retrain", d.get("retrain", {}), _RETRAIN_RULES)
    try:
        merge = MergeConfig(**merge_kw)
    except ValueError as e:  # the dataclass's own checks, should the rules above miss one
        raise RecipeError(f"{source}: [merge] {e}") from None
    return Recipe(merge=merge, retrain=RetrainConfig(**retrain_kw), **top)


# --------------------------------------------------------------------------------------------
# loading


def list_recipe_names() -> list[str]:
    """Names of the built-in recipes (the ``*.toml`` files of :data:`RECIPES_DIR`)."""
    if not RECIPES_DIR.is_dir():
        return []
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def _read(path: Path, source: str, default_name: str) -> Recipe:
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{source}: invalid TOML: {' '.join(str(e).split())}") from None
    except OSError as e:
        raise RecipeError(f"{source}: cannot read the recipe: {e.strerror or e}") from None
    return _build(doc, source, default_name)


def _looks_like_path(s: str) -> bool:
    return s.endswith(".toml") or "/" in s or (os.sep != "/" and os.sep in s)


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A built-in recipe by name (``"r031"``) or a recipe file by path (``"my/recipe.toml"``)."""
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(str(name_or_path)):
        path = Path(name_or_path)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)} not found")
        return _read(path, str(path), default_name=path.stem)
    name = str(name_or_path)
    builtin = RECIPES_DIR / f"{name}.toml"
    if name in list_recipe_names():
        recipe = _read(builtin, f"built-in recipe {name}.toml", default_name=name)
        if recipe.name != name:
            raise RecipeError(f'built-in recipe {name}.toml: name must match the file name "{name}", got {_fmt(recipe.name)}')
        return recipe
    choices = ", ".join(list_recipe_names()) or "(none installed)"
    raise RecipeError(f"unknown recipe {name!r}: choose one of {choices}, or pass a path to a .toml file")


def list_recipes() -> list[Recipe]:
    """All built-in recipes, sorted by name."""
    return [load_recipe(n) for n in list_recipe_names()]


# --------------------------------------------------------------------------------------------
# checkpoints and overrides


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain-data form of a resolved recipe (for checkpoints); :func:`recipe_from_dict` inverts it."""
    merge = asdict(recipe.merge)
    merge["layers"] = list(recipe.merge.layers)
    return {
        "name": recipe.name,
        "description": recipe.description,
        "version": recipe.version,
        "merge": merge,
        "retrain": asdict(recipe.retrain),
    }


def recipe_from_dict(d: dict[str, Any], source: str = "stored recipe") -> Recipe:
    """Rebuild (and re-validate) a recipe stored by :func:`recipe_to_dict`."""
    return _build(d, source)


def with_overrides(recipe: Recipe, **overrides: Any) -> Recipe:
    """``recipe`` with fields replaced: command line > recipe > default.

    Keys are ``name``, ``description`` or any field of ``[merge]`` / ``[retrain]`` (their names
    are distinct); ``None`` values mean "not given" and keep the recipe's value. Values are
    validated like a recipe file's (errors name ``overrides`` and the key).
    """
    top, merge_kw, retrain_kw = {}, {}, {}
    for k, v in overrides.items():
        if v is None:
            continue
        if k in ("name", "description"):
            top[k] = _check("overrides", None, k, v, _TOP_RULES)
        elif k in _MERGE_RULES:
            merge_kw[k] = _check("overrides", "merge", k, v, _MERGE_RULES)
        elif k in _RETRAIN_RULES:
            retrain_kw[k] = _check("overrides", "retrain", k, v, _RETRAIN_RULES)
        else:
            known = ["name", "description", *_MERGE_RULES, *_RETRAIN_RULES]
            near = difflib.get_close_matches(k, known, n=1)
            hint = f'; did you mean "{near[0]}"?' if near else ""
            raise RecipeError(f"overrides: unknown key {_fmt(k)}{hint}")
    try:
        merge = replace(recipe.merge, **merge_kw)
    except ValueError as e:
        raise RecipeError(f"overrides: [merge] {e}") from None
    return replace(recipe, merge=merge, retrain=replace(recipe.retrain, **retrain_kw), **top)
