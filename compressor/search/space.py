"""The search space: a merge schedule as the tokens removed before each layer, and the moves of
the local search. Pure arithmetic on :mod:`compressor.merge.schedule` (no tensors, no timing).

A *schedule* is a tuple ``s`` of ``depth`` integers: ``s[i]`` tokens are merged away before layer
``i`` (``s[0]`` is always 0: nothing is merged before the first block). Schedules are kept
*canonical*: each count is what :func:`~compressor.merge.schedule.merge_schedule` really removes
after its cap ``(L - has_cls) // 2``, so two spellings of the same merges are one schedule.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from ..merge.schedule import MergeConfig, MergeStep, merge_cap, merge_schedule

__all__ = ["Schedule", "Space", "MOVES"]

Schedule = tuple[int, ...]


@dataclass(frozen=True)
class Space:
    """Schedules of one model: ``num_tokens`` input tokens (class token included), class token
    at ``cls_index`` (None: mean readout), ``depth`` blocks. ``mode``/``ordered``/``distance``
    are copied into every :class:`MergeConfig` this space builds."""

    num_tokens: int
    cls_index: int | None
    depth: int
    mode: str = "merge"
    ordered: bool = True
    distance: str = "cosine"

    # ---------------------------------------------------------------- conversions

    def config(self, s: Schedule) -> MergeConfig:
        """The per-layer ``[merge]`` table of ``s`` (no merges: the uniform ``num_prune = 0``)."""
        return MergeConfig(mode=self.mode, ordered=self.ordered, distance=self.distance,
                           schedule={i: r for i, r in enumerate(s) if r})

    def steps(self, s: Schedule) -> list[MergeStep]:
        return merge_schedule(self.config(s), self.num_tokens, self.cls_index, self.depth)

    def canonical(self, requested: Sequence[int]) -> Schedule:
        """What ``requested`` (``depth`` counts, any values >= 0) really removes, per layer: the
        arithmetic of ``merge_schedule`` (its cap, layer 0 never merges) without building steps."""
        out, n, has_cls = [0] * self.depth, self.num_tokens, self.cls_index is not None
        for i in range(1, self.depth):
            r = min(max(0, int(requested[i])), merge_cap(n, has_cls))
            out[i], n = r, n - r
        return tuple(out)

    def from_config(self, merge: MergeConfig) -> Schedule:
        """The schedule a recipe's ``[merge]`` table performs on this model (any recipe form)."""
        out = [0] * self.depth
        for step in merge_schedule(merge, self.num_tokens, self.cls_index, self.depth):
            out[step.layer] = step.r
        return tuple(out)

    def tokens(self, s: Schedule) -> list[int]:
        """Tokens each layer processes (``s`` canonical)."""
        out, n = [], self.num_tokens
        for r in s:
            n -= r
            out.append(n)
        return out

    def merges(self, s: Schedule) -> list[tuple[int, int]]:
        """``(tokens_in, r)`` of each merge of ``s`` (canonical), in layer order."""
        out, n = [], self.num_tokens
        for r in s:
            if r:
                out.append((n, r))
            n -= r
        return out

    def plain(self) -> Schedule:
        return (0,) * self.depth

    def uniform(self, num_prune: int, interval: int) -> Schedule:
        """The built-in form: ``num_prune`` before every layer ``i > 0`` with ``i % interval == 0``."""
        return self.from_config(MergeConfig(num_prune=num_prune, interval=interval))

    def fastest(self) -> Schedule:
        """As many tokens as the cap allows before every layer: the fewest token-layers there are."""
        return self.canonical([0] + [self.num_tokens] * (self.depth - 1))

    def describe(self, s: Schedule) -> str:
        """``{2: 11, 4: 11}`` (layer: tokens removed), or ``none``."""
        merges = {i: r for i, r in enumerate(s) if r}
        return "{" + ", ".join(f"{i}: {r}" for i, r in merges.items()) + "}" if merges else "none"

    def room(self, s: Schedule) -> list[int]:
        """Layers before which one more token can be removed (their cap is not reached)."""
        out, n, has_cls = [], self.num_tokens, self.cls_index is not None
        for i in range(1, self.depth):
            if s[i] < merge_cap(n, has_cls):
                out.append(i)
            n -= s[i]
        return out


# -------------------------------------------------------------------------------------------- moves
# Each move takes a canonical schedule and the search's seeded RNG and returns requested counts
# (canonicalised by the caller), a description, and the layers where the search's repair should
# add tokens first to win back the speed the move lost (empty: anywhere). A move changes where
# tokens go; the repair then sets how many the goal needs (strategy.Search.repair).

Move = tuple[list[int], str, list[int]]


def _merge_layers(s: Schedule) -> list[int]:
    return [i for i, r in enumerate(s) if r]


def exchange(s: Schedule, rng: random.Random) -> Move:
    """Take some tokens away from one merge; the repair makes them up at another layer (later:
    usually gentler but more tokens are needed; earlier: the reverse)."""
    layers = _merge_layers(s)
    out = list(s)
    if not layers:
        return tweak(s, rng)
    i = rng.choice(layers)
    j = rng.choice([k for k in range(1, len(s)) if k != i])
    d = rng.randint(1, s[i])
    out[i] -= d
    return out, f"move {d} from layer {i} to {j}", [j]


def slide(s: Schedule, rng: random.Random) -> Move:
    """Move one whole merge by one or two layers."""
    layers = _merge_layers(s)
    out = list(s)
    if not layers:
        return tweak(s, rng)
    i = rng.choice(layers)
    j = min(len(s) - 1, max(1, i + rng.choice((-2, -1, 1, 2))))
    if j != i:
        out[j] += out[i]
        out[i] = 0
    return out, f"slide layer {i} to {j}", [j]


def tweak(s: Schedule, rng: random.Random) -> Move:
    """Change one layer's count by a few tokens (up or down)."""
    out = list(s)
    i = rng.randrange(1, len(s))
    d = rng.choice((-3, -2, -1, 1, 2, 3))
    out[i] = max(0, out[i] + d)
    return out, f"tweak layer {i} by {d:+d}", []


def spread(s: Schedule, rng: random.Random) -> Move:
    """Split one merge into two (half moves to another layer)."""
    layers = [i for i in _merge_layers(s) if s[i] >= 2]
    out = list(s)
    if not layers:
        return tweak(s, rng)
    i = rng.choice(layers)
    j = rng.choice([k for k in range(1, len(s)) if k != i])
    half = s[i] // 2
    out[i] -= half
    out[j] += half
    return out, f"spread {half} of layer {i} to {j}", [j]


MOVES: dict[str, Callable[[Schedule, random.Random], Move]] = {
    "exchange": exchange, "slide": slide, "tweak": tweak, "spread": spread,
}


def crossover(a: Schedule, b: Schedule, rng: random.Random) -> Move:
    """Layers before a random cut from ``a``, the rest from ``b``."""
    cut = rng.randrange(1, len(a))
    return list(a[:cut]) + list(b[cut:]), f"crossover at layer {cut}", []
