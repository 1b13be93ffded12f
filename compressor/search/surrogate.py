"""A linear surrogate of the damage a schedule does, to propose schedules worth scoring.

The KL between the merged and the unmerged model's outputs is fitted as ``sum_i w_i * s[i]``
(one non-negative weight per layer: the damage of one token merged away there) on every
schedule scored so far, by ridge regression (negative weights clipped to a small floor: merging
a token never helps in expectation). A proposal fills a schedule greedily, always adding the
tokens with the best predicted speed per unit of damage, until the timing model predicts the
goal. The weights are jittered by the search's RNG for each proposal so that proposals differ.

This is first order: merges interact (a merge early changes what a later one sees), which the
search's scoring then measures; the surrogate only decides what to score next.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import numpy as np

from .space import Schedule, Space

__all__ = ["fit_damage", "propose", "fill", "improve"]

STEPS = (1, 2, 4, 8, 16)  # token counts tried per layer at each greedy step (block timings move in steps)


def fit_damage(schedules: list[Schedule], kl: list[float], smooth: float = 1e-3) -> np.ndarray | None:
    """Per-layer damage weights ``w`` (``len = depth``, ``w[0] = 0``) with ``kl ~ X @ w``; None
    with fewer than 3 schedules. Neighbouring layers are pulled together (a penalty on
    ``w[i+1] - w[i]``, weighted by ``smooth`` times the data's scale), so layers that few scored
    schedules merge at borrow from their neighbours instead of looking free."""
    if len(schedules) < 3:
        return None
    x = np.asarray(schedules, dtype=np.float64)[:, 1:]
    y = np.asarray(kl, dtype=np.float64)
    scale = max(float(np.abs(x).max()), 1.0)
    xs = x / scale
    n = xs.shape[1]
    a = xs.T @ xs
    lam = smooth * max(float(np.trace(a)) / n, 1e-12)
    d = np.diff(np.eye(n), axis=0)
    w = np.linalg.solve(a + lam * (d.T @ d) + 1e-6 * lam * np.eye(n), xs.T @ y) / scale
    floor = max(float(np.abs(w).max()) * 1e-3, 1e-12)
    return np.concatenate([[0.0], np.maximum(w, floor)])


def propose(space: Space, speed: Callable[[Schedule], float], goal: float, w: np.ndarray,
            rng: random.Random, jitter: float = 0.3, passes: int = 2) -> Schedule | None:
    """The schedule the (jittered) damage weights ``w`` predict best at ``speed(s) >= goal``:
    :func:`fill` then :func:`improve`. None if the goal is out of reach."""
    w = [wi * math.exp(rng.gauss(0.0, jitter)) for wi in w]
    s = fill(space, speed, goal, w)
    return None if s is None else improve(space, speed, goal, w, s, rng, passes)


def _damage(w: list[float], s: Schedule) -> float:
    return sum(wi * r for wi, r in zip(w, s))


def _top_up(space: Space, speed, goal: float, s: list[int], j: int) -> Schedule | None:
    """``s`` with the fewest tokens added before layer ``j`` that reach the goal (bisection: the
    speed does not fall as tokens are added), or None if ``j``'s cap is not enough."""
    lo, hi = 0, space.num_tokens
    if speed(space.canonical([r + (hi if k == j else 0) for k, r in enumerate(s)])) < goal:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if speed(space.canonical([r + (mid if k == j else 0) for k, r in enumerate(s)])) >= goal:
            hi = mid
        else:
            lo = mid + 1
    return space.canonical([r + (lo if k == j else 0) for k, r in enumerate(s)])


def improve(space: Space, speed, goal: float, w: list[float], s: Schedule, rng: random.Random,
            passes: int = 2) -> Schedule:
    """Pairwise exchanges under the surrogate: take ``d`` tokens from one merge, make up the speed
    at another layer (:func:`_top_up`), keep the change when the predicted damage falls."""
    for _ in range(passes):
        better = False
        pairs = [(i, j) for i in range(1, space.depth) for j in range(1, space.depth) if i != j]
        rng.shuffle(pairs)
        for i, j in pairs:
            for d in (1, 4, 16):
                if s[i] < d:
                    break
                t = _top_up(space, speed, goal, [r - (d if k == i else 0) for k, r in enumerate(s)], j)
                if t is not None and _damage(w, t) < _damage(w, s) * (1 - 1e-9):
                    s, better = t, True
                    break
        if not better:
            break
    return s


def fill(space: Space, speed: Callable[[Schedule], float], goal: float, w: list[float]) -> Schedule | None:
    """Greedy fill: from the plain schedule, repeatedly add the (layer, count) with the best
    speed-up gained per unit of damage until ``speed(s) >= goal``. None if unreachable."""
    s = space.plain()
    while speed(s) < goal:
        here, best, pick = speed(s), -1.0, None
        for i in space.room(s):
            for k in STEPS:
                t = space.canonical([r + (k if j == i else 0) for j, r in enumerate(s)])
                damage = sum(wj * (a - b) for wj, a, b in zip(w, t, s))  # caps may shrink later merges
                if t == s or damage <= 0:
                    continue
                gain = (speed(t) - here) / damage
                if gain > best:
                    best, pick = gain, t
        if pick is None:
            return None
        s = pick
    return s
