"""The search: the best-scoring merge schedule whose speed-up reaches a goal, within a budget.

1. **Plain and calibration.** The plain model is timed whole. The smallest uniform schedule
   (every 2nd layer) predicted to reach the goal is timed whole too, and ``alpha`` (measured over
   predicted savings) rescales every later prediction (:mod:`compressor.search.timing`).
2. **Seeds.** The plain model, the compared recipes, and for each interval 1..4 the smallest
   uniform ``num_prune`` predicted to reach the goal and the one below it are scored.
3. **Local search.** A parent is drawn (binary tournament among the 8 best schedules that reach
   the goal), changed by one move (move tokens between layers, slide a merge, tweak a count,
   split a merge, or cross over with a second parent), then *repaired*: tokens are added one at
   a time (first where the move sent them) until the prediction reaches the goal, and removed again one at a time while it stays
   there, so every child sits just above the goal. New children are scored; repeats are skipped
   (``patience`` repeats in a row end the search: the neighbourhood is exhausted). Half of the
   children come instead from a linear model of the KL per token merged at each layer, fitted
   on everything scored so far (:mod:`compressor.search.surrogate`).
4. **Confirmation.** The plain model is re-timed, then the ``confirm`` best schedules predicted
   to reach the goal are timed whole; the best of those whose measured speed-up reaches the goal
   wins. If none does, ``alpha`` is re-fitted on every whole timing and the next ones are tried
   (when none is left, the best few are repaired under the new prediction and scored).
   Each compared recipe is timed whole, with the best schedule predicted at least as fast.

All choices come from one ``random.Random(seed)`` and deterministic sorts: the same seed, timing
table, scores and number of evaluations give the same result. ``budget_s`` counts the whole run
(part timings included) and keeps back the time the confirmation needs.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

from .quality import objective_key
from .space import MOVES, Schedule, Space, crossover
from .surrogate import fit_damage, propose
from .timing import TimingModel

__all__ = ["Candidate", "SearchConfig", "SearchResult", "Search", "pareto_front"]


@dataclass
class Candidate:
    """One scored schedule. ``predicted_ms`` uses the final ``alpha``; ``measured_ms`` is set when
    it was timed whole (``measured_speedup`` against the plain model re-timed in the same run)."""

    index: int
    schedule: Schedule
    origin: str
    predicted_ms: float
    predicted_speedup: float
    quality: dict
    marks: list[str] = field(default_factory=list)
    measured_ms: float | None = None
    measured_speedup: float | None = None

    @property
    def speedup(self) -> float:
        """Measured when timed whole, else predicted."""
        return self.measured_speedup if self.measured_speedup is not None else self.predicted_speedup


@dataclass(frozen=True)
class SearchConfig:
    """The target, one of: ``required_speedup`` over the plain model; ``latency_ms`` per batch
    (turned into ``plain_ms / latency_ms`` once the plain model is timed); ``target_schedule``,
    whose speed-up is measured whole at the start (e.g. a recipe's: "as fast as r031"). The
    search aims at the required speed-up times ``1 + margin``."""

    required_speedup: float | None = None
    latency_ms: float | None = None
    target_schedule: Schedule | None = None
    objective: str = "agreement"
    seed: int = 0
    budget_s: float = 600.0
    max_evals: int | None = None
    margin: float = 0.01
    confirm: int = 3
    patience: int = 200
    intervals: tuple[int, ...] = (1, 2, 3, 4)
    pool: int = 8
    surrogate: float = 0.5  # share of children proposed by the linear damage model (surrogate.py)


@dataclass
class SearchResult:
    status: str  # "found" | "unreachable" | "unconfirmed"
    required_speedup: float
    goal_speedup: float
    best: Candidate | None
    candidates: list[Candidate]
    pareto: list[int]
    comparisons: list[dict]
    stopped: str
    evals: int
    elapsed_s: float
    plain_ms: float
    plain_ms_confirm: float
    alpha: float
    whole_timings: list[dict]

    def fastest(self) -> Candidate | None:
        """The fastest schedule scored (measured speed where timed)."""
        return max(self.candidates, key=lambda c: c.speedup, default=None)


def pareto_front(cands: list[Candidate], objective: str) -> list[int]:
    """Indices of the candidates no other one beats on both predicted speed-up and objective."""
    front = []
    for c in cands:
        kc = objective_key(c.quality, objective)
        dominated = any(
            o.predicted_speedup >= c.predicted_speedup and objective_key(o.quality, objective) >= kc
            and (o.predicted_speedup > c.predicted_speedup or objective_key(o.quality, objective) > kc)
            for o in cands
        )
        if not dominated:
            front.append(c.index)
    return front


class Search:
    """One search run (module docstring). ``scorer(schedule) -> quality dict`` (see
    :class:`~compressor.search.quality.QualityScorer`); ``compare``: recipe name -> schedule, scored
    and timed for reference; ``progress(phase, fraction_of_budget, message)``; ``clock``: seconds."""

    def __init__(self, space: Space, timing: TimingModel, scorer: Callable[[Schedule], dict], cfg: SearchConfig, *,
                 compare: dict[str, Schedule] | None = None, clock: Callable[[], float] = time.monotonic,
                 progress: Callable[[str, float, str], None] | None = None):
        self.space, self.timing, self.scorer, self.cfg = space, timing, scorer, cfg
        self.compare = dict(compare or {})
        self.clock, self.progress_fn = clock, progress
        if sum(t is not None for t in (cfg.required_speedup, cfg.latency_ms, cfg.target_schedule)) != 1:
            raise ValueError("give exactly one of required_speedup, latency_ms and target_schedule")
        self.rng = random.Random(cfg.seed)
        self.cands: dict[Schedule, Candidate] = {}
        self.whole: list[dict] = []
        self.stopped = ""

    # ---------------------------------------------------------------- helpers

    def speed(self, s: Schedule) -> float:
        return self.timing.plain_ms / self.timing.predict(s)

    def _elapsed(self) -> float:
        return self.clock() - self.t0

    def _out_of_budget(self) -> bool:
        if self.cfg.max_evals is not None and len(self.cands) >= self.cfg.max_evals:
            self.stopped = self.stopped or f"max evaluations ({self.cfg.max_evals})"
            return True
        if self._elapsed() + self.reserve_s >= self.cfg.budget_s:
            self.stopped = self.stopped or f"time budget ({self.cfg.budget_s:.0f} s)"
            return True
        return False

    def _progress(self, phase: str, message: str = "") -> None:
        if self.progress_fn is not None:
            self.progress_fn(phase, min(1.0, self._elapsed() / self.cfg.budget_s), message)

    def _best_line(self) -> str:
        ok = self._ranked()
        if not ok:
            return f"{len(self.cands)} scored, none predicted at x{self.goal:.3f} yet"
        q = ok[0].quality
        return (f"{len(self.cands)} scored; best at >= x{self.goal:.3f}: x{self.speed(ok[0].schedule):.3f}, "
                f"agreement {q['agreement']:.1%}, KL {q['kl']:.4f}")

    def evaluate(self, s: Schedule, origin: str, marks: tuple[str, ...] = ()) -> Candidate:
        if s in self.cands:
            c = self.cands[s]
            c.marks += [m for m in marks if m not in c.marks]
            return c
        pred = self.timing.predict(s)
        c = Candidate(len(self.cands), s, origin, pred, self.timing.plain_ms / pred, self.scorer(s), list(marks))
        self.cands[s] = c
        self._progress("search", self._best_line())
        return c

    def _ranked(self) -> list[Candidate]:
        """Scored schedules predicted to reach the goal, best first (ties: faster, then older)."""
        ok = [c for c in self.cands.values() if self.speed(c.schedule) >= self.goal]
        return sorted(ok, key=lambda c: (objective_key(c.quality, self.cfg.objective), self.speed(c.schedule), -c.index),
                      reverse=True)

    def _time_whole(self, c_or_s, why: str) -> float:
        s = c_or_s.schedule if isinstance(c_or_s, Candidate) else c_or_s
        ms = self.timing.whole_ms(s)
        self.whole.append({"schedule": self.space.describe(s), "why": why, "measured_ms": ms, "plain_ms": self.plain_confirm,
                           "predicted_ms": self.timing.predict(s), "savings_ms": self.timing.savings_ms(s)})
        if isinstance(c_or_s, Candidate):
            c_or_s.measured_ms = ms
            c_or_s.measured_speedup = self.plain_confirm / ms
        return ms

    def _fit_alpha(self) -> None:
        """Least squares through the origin: measured - plain = alpha * predicted savings, on the
        whole timings that save at least 2% (smaller savings are mostly timing noise)."""
        pts = [(w["measured_ms"] - w["plain_ms"], w["savings_ms"]) for w in self.whole
               if w["savings_ms"] < -0.02 * w["plain_ms"]]
        den = sum(p * p for _, p in pts)
        if den > 0:
            self.timing.alpha = min(2.0, max(0.5, sum(m * p for m, p in pts) / den))

    # ---------------------------------------------------------------- phases

    def _calibrate(self) -> None:
        s = self._smallest_uniform(2)
        if s is None or not any(s):
            return
        self._time_whole(s, "calibration")
        self._fit_alpha()

    def _smallest_uniform(self, interval: int) -> Schedule | None:
        """The uniform schedule with the smallest num_prune predicted to reach the goal."""
        if interval >= self.space.depth:
            return None
        prev = None
        for n in range(1, self.space.num_tokens):
            s = self.space.uniform(n, interval)
            if s == prev:  # capped everywhere: more num_prune changes nothing
                return None
            if self.speed(s) >= self.goal:
                return s
            prev = s
        return None

    def _seeds(self) -> None:
        self.evaluate(self.space.plain(), "plain (no merges)", ("none",))
        for name, s in self.compare.items():
            self.evaluate(s, f"recipe {name}", (name,))
        for interval in self.cfg.intervals:
            if self._out_of_budget():
                return
            s = self._smallest_uniform(interval)
            if s is None:
                continue
            n = max(s)
            self.evaluate(s, f"uniform {n} every {interval}")
            below = self.space.uniform(n - 1, interval)
            if any(below) and not self._out_of_budget():
                self.evaluate(below, f"uniform {n - 1} every {interval}")

    def repair(self, s: Schedule, focus: list[int] = ()) -> Schedule | None:
        """Add tokens one at a time until the prediction reaches the goal (at the ``focus``
        layers while they have room, else mostly at existing merges), then remove tokens one at
        a time while it stays there. None if the goal is out of reach."""
        space, rng = self.space, self.rng
        while self.speed(s) < self.goal:
            room = space.room(s)
            if not room:
                return None
            first = [i for i in focus if i in room]
            merged = [i for i in room if s[i]]
            if first:
                i = rng.choice(first)
            else:
                i = rng.choice(merged if merged and rng.random() < 0.75 else room)
            s = space.canonical([r + (k == i) for k, r in enumerate(s)])
        trimmed = True
        while trimmed:
            trimmed = False
            layers = [i for i, r in enumerate(s) if r]
            rng.shuffle(layers)
            for i in layers:
                t = space.canonical([r - (k == i) for k, r in enumerate(s)])
                if self.speed(t) >= self.goal:
                    s, trimmed = t, True
        return s

    def _child(self) -> tuple[Schedule | None, str]:
        pool = self._ranked()[: self.cfg.pool]
        if not pool:
            return None, ""
        rng = self.rng
        if rng.random() < self.cfg.surrogate:
            done = list(self.cands.values())
            w = fit_damage([c.schedule for c in done], [c.quality["kl"] for c in done])
            if w is not None:
                s = propose(self.space, self.speed, self.goal, w, rng)
                return (None, "") if s is None else (self.repair(s), "surrogate proposal")
        a, b = rng.choice(pool), rng.choice(pool)
        parent = a if objective_key(a.quality, self.cfg.objective) >= objective_key(b.quality, self.cfg.objective) else b
        op = rng.choice(sorted(MOVES) + ["crossover"])
        if op == "crossover":
            other = rng.choice(pool)
            requested, how, focus = crossover(parent.schedule, other.schedule, rng)
            how = f"{how} with #{other.index}"
        else:
            requested, how, focus = MOVES[op](parent.schedule, rng)
        child = self.repair(self.space.canonical(requested), focus)
        return child, f"#{parent.index}: {how}"

    def _evolve(self) -> None:
        repeats = 0
        while not self._out_of_budget():
            child, origin = self._child()
            if child is None:
                self.stopped = "no schedule reaches the goal to start from"
                return
            if child in self.cands:
                repeats += 1
                if repeats >= self.cfg.patience:
                    self.stopped = f"converged ({repeats} repeated schedules in a row)"
                    return
                continue
            repeats = 0
            self.evaluate(child, origin)

    def _confirm(self) -> Candidate | None:
        self._progress("confirm", "re-timing the plain model")
        self.plain_confirm = self.timing.measure_plain()
        if self.cfg.latency_ms is not None:  # an absolute target: measured_ms <= latency / (1 + margin)
            self.required = self.plain_confirm / self.cfg.latency_ms
            self.goal = self.required * (1 + self.cfg.margin)
        confirmed: list[Candidate] = []
        limit = 3 * self.cfg.confirm
        while len(confirmed) < limit:
            todo = [c for c in self._ranked() if c.measured_ms is None]
            if not todo and confirmed:
                todo = self._repaired_finalists()
            if not todo:
                break
            for c in todo[: self.cfg.confirm if not confirmed else 1]:
                self._progress("confirm", f"timing #{c.index} whole ({self.space.describe(c.schedule)})")
                self._time_whole(c, "confirm")
                confirmed.append(c)
            winners = [c for c in confirmed if c.measured_speedup >= self.goal]
            if winners:
                return max(winners, key=lambda c: (objective_key(c.quality, self.cfg.objective), c.measured_speedup))
            self._fit_alpha()  # the predictions were optimistic: re-fit on every whole timing
        return None

    def _repaired_finalists(self) -> list[Candidate]:
        """After a re-fit left no scored schedule predicted at the goal: the best few, repaired
        (tokens added) under the new prediction and scored."""
        by_quality = sorted(self.cands.values(), key=lambda c: (objective_key(c.quality, self.cfg.objective), -c.index),
                            reverse=True)
        out = []
        for c in by_quality[: self.cfg.confirm]:
            s = self.repair(c.schedule)
            if s is not None and s not in self.cands:
                out.append(self.evaluate(s, f"#{c.index} repaired after re-fit"))
        return sorted(out, key=lambda c: objective_key(c.quality, self.cfg.objective), reverse=True)

    def _compare(self) -> list[dict]:
        out = []
        for name in self.compare:
            rc = self.evaluate(self.compare[name], f"recipe {name}", (name,))
            if rc.measured_ms is None:
                self._time_whole(rc, f"recipe {name}")
            rivals = sorted((c for c in self.cands.values() if c is not rc and self.speed(c.schedule) >= rc.measured_speedup),
                            key=lambda c: (objective_key(c.quality, self.cfg.objective), -c.index), reverse=True)
            match = None
            for c in rivals[:3]:
                if c.measured_ms is None:
                    self._time_whole(c, f"rival of {name}")
                if c.measured_speedup >= rc.measured_speedup:
                    match = c
                    break
            better = match is not None and objective_key(match.quality, self.cfg.objective) > objective_key(rc.quality, self.cfg.objective)
            out.append({"recipe": name, "index": rc.index, "measured_speedup": rc.measured_speedup, "quality": rc.quality,
                        "rival": None if match is None else match.index, "rival_better": better})
        return out

    # ---------------------------------------------------------------- run

    def run(self) -> SearchResult:
        self.t0, self.reserve_s = self.clock(), 0.0
        self._progress("plain", "timing the plain model")
        t = self.clock()
        self.plain_start = self.timing.measure_plain()
        self.plain_confirm = self.plain_start
        if self.cfg.target_schedule is not None:
            self.required = self.plain_start / self._time_whole(self.cfg.target_schedule, "target")
        else:
            self.required = self.cfg.required_speedup or self.plain_start / self.cfg.latency_ms
        self.goal = self.required * (1 + self.cfg.margin)
        # keep back what the confirmation needs: whole timings of the finalists and the recipes
        self.reserve_s = (self.clock() - t) * (2 + self.cfg.confirm + 2 * len(self.compare))
        fastest = self.space.fastest()
        status, best = "unreachable", None
        if self.speed(fastest) >= self.goal:
            self._progress("calibrate", "timing one uniform schedule whole")
            self._calibrate()
            self._seeds()
            if self.speed(fastest) >= self.goal:  # still reachable after calibration
                self._evolve()
            best = self._confirm()
            status = "found" if best is not None else "unconfirmed"
        if best is None:
            self.evaluate(self.space.plain(), "plain (no merges)", ("none",))
            c = self.evaluate(fastest, "fastest possible (the cap before every layer)")
            if c.measured_ms is None:
                self._time_whole(c, "fastest")
            status = "unreachable" if c.measured_speedup < self.goal else status
        comparisons = self._compare()
        return self._result(status, best, comparisons)

    def _result(self, status: str, best: Candidate | None, comparisons: list[dict]) -> SearchResult:
        cands = list(self.cands.values())
        for c in cands:  # every prediction under the final alpha and plain time
            c.predicted_ms = self.timing.predict(c.schedule)
            c.predicted_speedup = self.timing.plain_ms / c.predicted_ms
        return SearchResult(
            status=status, required_speedup=self.required, goal_speedup=self.goal, best=best, candidates=cands,
            pareto=pareto_front(cands, self.cfg.objective), comparisons=comparisons,
            stopped=self.stopped or "done", evals=len(cands), elapsed_s=self._elapsed(), plain_ms=self.plain_start,
            plain_ms_confirm=self.plain_confirm, alpha=self.timing.alpha, whole_timings=self.whole,
        )
