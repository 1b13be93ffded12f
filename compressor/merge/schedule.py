"""Where merges happen and how many tokens each removes: pure arithmetic, no tensors.

Semantics (official R-MeeTo, see docs/design.md): a merge runs at the start of layer ``i`` when
``i > 0 and i % interval == 0`` (``odd``: ``(i + 1) % interval == 0``) or when ``i`` is listed in
``layers``; it removes ``r = min(num_prune, (L - 1) // 2)`` tokens (``L`` counts the class token);
with ``final_tokens > 0`` the last merge layer instead merges down to ``final_tokens`` tokens
(capped the same way). A per-layer ``schedule`` (``{layer: tokens}``) replaces all of that: a
merge runs before each listed layer and removes ``r = min(tokens, (L - 1) // 2)``. The class token moves from ``tp`` to ``(tp * (L - r)) // L`` (ordered) or
``(tp * (n_src - r)) // n_src`` with ``n_src = ceil((L - 1) / 2)`` (unordered).

Two class tokens (hustvl/Vim's ``use_double_cls_token``: one at the head, one at the tail) are
both protected: the cap becomes ``(L - 2) // 2`` and each token follows the same rule on its own
(a head token stays at 0, a tail token stays last); where the rule would put both on one slot,
the second goes one further (see :func:`class_token_after`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

MODES = ("merge", "prune")
DISTANCES = ("cosine", "l1", "l2")
METRICS = ("x",)
#: the uniform schedule's keys, which a per-layer ``schedule`` replaces
UNIFORM_KEYS = ("num_prune", "interval", "odd", "layers", "final_tokens")


def _pairs(schedule: Mapping | Iterable) -> tuple[tuple[int, int], ...]:
    """``{layer: r}`` or ``[(layer, r), ...]`` → sorted ``((layer, r), ...)``; keys may be digit
    strings (TOML table keys are strings)."""
    items = schedule.items() if isinstance(schedule, Mapping) else schedule
    out = {}
    for layer, r in items:
        layer = int(layer)
        if layer in out:
            raise ValueError(f"schedule lists layer {layer} twice")
        out[layer] = int(r)
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class MergeConfig:
    """The ``[merge]`` table of a recipe.

    ``schedule``: per-layer merges as ``((layer, tokens_removed), ...)`` sorted by layer (a dict
    ``{layer: r}`` is accepted and normalised). When given, ``num_prune``, ``layers`` and
    ``final_tokens`` must stay at their defaults and ``interval`` / ``odd`` are not used."""

    mode: str = "merge"
    num_prune: int = 0
    interval: int = 2
    odd: bool = False
    layers: tuple[int, ...] = field(default_factory=tuple)
    final_tokens: int = 0
    ordered: bool = True
    distance: str = "cosine"
    metric: str = "x"
    schedule: tuple[tuple[int, int], ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.num_prune < 0 or self.final_tokens < 0:
            raise ValueError("num_prune and final_tokens must be >= 0")
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if any(i < 1 for i in self.layers):
            raise ValueError(f"layers must be >= 1 (no merge before the first block), got {list(self.layers)}")
        object.__setattr__(self, "schedule", _pairs(self.schedule))
        object.__setattr__(self, "_counts", dict(self.schedule))  # prune_at's lookup (not a field)
        if any(layer < 1 or r < 0 for layer, r in self.schedule):
            raise ValueError(f"schedule needs layers >= 1 and token counts >= 0, got {dict(self.schedule)}")
        if self.schedule and (self.num_prune or self.layers or self.final_tokens):
            raise ValueError("schedule gives every merge layer and its token count: leave num_prune, layers and "
                             "final_tokens out")

    @property
    def per_layer(self) -> bool:
        """True for a per-layer ``schedule``, False for the uniform ``num_prune`` / ``interval`` form."""
        return bool(self.schedule)

    def explicit_layers(self) -> tuple[int, ...]:
        """The layers a recipe names (``schedule`` or ``layers``), which must exist in the model."""
        return tuple(layer for layer, _ in self.schedule) or self.layers

    def prune_at(self, layer: int) -> int:
        """Tokens requested at merge layer ``layer`` before the cap: the schedule's count, else ``num_prune``."""
        if self.schedule:
            return self._counts.get(layer, 0)
        return self.num_prune

    def merge_layers(self, depth: int) -> list[int]:
        """Layer indices (0-based) before which a merge runs."""
        if self.schedule:
            return [layer for layer, _ in self.schedule if layer < depth]
        if self.layers:
            return sorted(i for i in set(self.layers) if i < depth)
        if self.odd:
            return [i for i in range(1, depth) if (i + 1) % self.interval == 0]
        return [i for i in range(1, depth) if i % self.interval == 0]


#: A class-token position: one index, two ascending indices (two class tokens), or None.
ClsIndex = int | tuple[int, ...] | None


def cls_positions(cls: ClsIndex) -> tuple[int, ...]:
    """The class-token positions as a tuple: ``()`` for None, ``(i,)`` for one index."""
    if cls is None:
        return ()
    return tuple(cls) if isinstance(cls, (tuple, list)) else (cls,)


@dataclass(frozen=True)
class MergeStep:
    """One merge: before ``layer``, ``tokens_in`` → ``tokens_out`` (``r`` removed); the class
    token moves from ``cls_in`` to ``cls_out`` (both None without a class token; both tuples of
    two ascending positions with two class tokens)."""

    layer: int
    tokens_in: int
    r: int
    cls_in: ClsIndex
    cls_out: ClsIndex

    @property
    def tokens_out(self) -> int:
        return self.tokens_in - self.r


def _one_after(cls_in: int, tokens_in: int, r: int, ordered: bool, n_cls: int) -> int:
    if ordered:
        return (cls_in * (tokens_in - r)) // tokens_in
    n_src = -(-(tokens_in - n_cls) // 2)
    return (cls_in * (n_src - r)) // n_src


def class_token_after(cls_in: ClsIndex, tokens_in: int, r: int, ordered: bool = True) -> ClsIndex:
    """New class-token index after removing ``r`` of ``tokens_in`` tokens (class tokens included).

    A tuple of two positions (two class tokens) gives a tuple: each moves by the one-token rule
    (a head token stays at 0; a tail token at ``tokens_in - 1`` goes to ``tokens_in - r - 1``,
    still last). The rule is monotone but may map two adjacent positions onto one slot; then the
    second takes the next slot, so that the two stay distinct and in order (that slot exists:
    the first lands at most two before the end)."""
    if cls_in is None:
        return None
    if not isinstance(cls_in, tuple):
        return _one_after(cls_in, tokens_in, r, ordered, 1)
    out = []
    for p in cls_in:
        q = _one_after(p, tokens_in, r, ordered, len(cls_in))
        out.append(max(q, out[-1] + 1) if out else q)
    return tuple(out)


def merge_cap(tokens_in: int, has_cls: bool | int) -> int:
    """The most tokens one merge can remove: half of the tokens other than the class tokens
    (``has_cls``: a bool for one class token or none, or the number of class tokens)."""
    return (tokens_in - int(has_cls)) // 2


def merge_schedule(cfg: MergeConfig, num_tokens: int, cls_index: ClsIndex, depth: int) -> list[MergeStep]:
    """The merges a recipe performs on a model with ``num_tokens`` input tokens (class tokens at
    ``cls_index``: an index, a tuple of two, or None). Merges that would remove nothing are left
    out (they are no-ops)."""
    layers = cfg.merge_layers(depth)
    has_cls = len(cls_positions(cls_index))
    steps, L, tp = [], num_tokens, cls_index
    for k, layer in enumerate(layers):
        cap = merge_cap(L, has_cls)
        want = L - cfg.final_tokens if cfg.final_tokens > 0 and k == len(layers) - 1 else cfg.prune_at(layer)
        r = max(0, min(want, cap))
        if r == 0:
            continue
        new_tp = class_token_after(tp, L, r, cfg.ordered)
        steps.append(MergeStep(layer, L, r, tp, new_tp))
        L, tp = L - r, new_tp
    return steps


def tokens_per_layer(steps: list[MergeStep], num_tokens: int, depth: int) -> list[int]:
    """Tokens each layer processes (after the merge at its start, if any)."""
    by_layer = {s.layer: s.tokens_out for s in steps}
    out, L = [], num_tokens
    for i in range(depth):
        L = by_layer.get(i, L)
        out.append(L)
    return out


def cls_per_layer(steps: list[MergeStep], cls_index: ClsIndex, depth: int) -> list[ClsIndex]:
    by_layer = {s.layer: s.cls_out for s in steps}
    out, tp = [], cls_index
    for i in range(depth):
        tp = by_layer.get(i, tp)
        out.append(tp)
    return out


def reduction_ratio(steps: list[MergeStep], num_tokens: int, depth: int) -> float:
    """Removed token-layer slots over ``depth * num_tokens`` (the paper's 0.14 / 0.31 / ...)."""
    return 1.0 - sum(tokens_per_layer(steps, num_tokens, depth)) / (depth * num_tokens)
