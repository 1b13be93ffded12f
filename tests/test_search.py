"""``rmeeto search``'s logic on a fake timing table and a fake scorer (deterministic, fast): the
space's arithmetic, the repair, the surrogate, the Pareto set, determinism, budgets, targets."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from compressor.merge.schedule import MergeConfig, merge_schedule
from compressor.recipes import load_recipe
from compressor.search import Search, SearchConfig, Space, TableTiming, pareto_front
from compressor.search.space import MOVES, crossover
from compressor.search.strategy import Candidate
from compressor.search.surrogate import fit_damage, propose

SPACE = Space(65, 32, 12)  # the CIFAR-10 model of docs/benchmarks.md: 64 patches + class token, depth 12


def block_ms(n: int) -> float:
    """Steps of 16 tokens, as the scan kernels' tiles make the real cost move."""
    return 0.5 + 0.1 * math.ceil(n / 16)


PLAIN_MS = 0.3 + 12 * block_ms(65)


def true_loss(s) -> float:
    """Early merges hurt more: the damage of a token at layer i decays with i."""
    return sum(r * math.exp(-i / 4) for i, r in enumerate(s))


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(required=1.3, *, seed=0, alpha=0.9, budget=1e9, max_evals=40, latency_ms=None, compare=None, margin=0.01,
         target_schedule=None):
    """A search on SPACE whose whole-model time is ``plain + alpha * predicted savings`` and whose
    scorer advances a fake clock by 1 s per schedule."""
    clock = Clock()
    timing = TableTiming(SPACE, block_ms, lambda n: 0.01, PLAIN_MS,
                         whole=lambda s: PLAIN_MS + alpha * timing.savings_ms(s))

    def scorer(s):
        clock.t += 1.0
        loss = true_loss(s)
        return {"agreement": round(math.exp(-loss / 40), 4), "kl": loss / 100, "top1": None, "seconds": 1.0}

    cfg = SearchConfig(required_speedup=None if latency_ms or target_schedule else required, latency_ms=latency_ms,
                       target_schedule=target_schedule, seed=seed,
                       budget_s=budget, max_evals=max_evals, margin=margin, patience=50)
    return Search(SPACE, timing, scorer, cfg, compare=compare or {}, clock=clock), timing, clock


# ---------------------------------------------------------------- space


def test_canonical_is_merge_schedules_arithmetic():
    rng = random.Random(0)
    for space in (SPACE, Space(197, 98, 24), Space(196, None, 24), Space(197, 0, 24)):
        for _ in range(200):
            req = [0] + [rng.choice((0, 0, 1, 5, 11, 40, 200)) for _ in range(space.depth - 1)]
            steps = merge_schedule(MergeConfig(schedule={i: r for i, r in enumerate(req) if r}), space.num_tokens,
                                   space.cls_index, space.depth)
            expect = [0] * space.depth
            for st in steps:
                expect[st.layer] = st.r
            assert space.canonical(req) == tuple(expect)
            s = space.canonical(req)
            assert space.tokens(s) == [space.num_tokens - sum(s[: i + 1]) for i in range(space.depth)]
            assert space.steps(s) == steps


def test_uniform_and_recipes_and_fastest():
    big = Space(197, 98, 24)
    r031 = big.from_config(load_recipe("r031").merge)
    assert r031 == big.uniform(11, 2) and big.tokens(r031)[-1] == 76
    fastest = big.fastest()
    assert fastest[1] == 98 and big.room(fastest) == [] and all(r >= 0 for r in fastest)
    assert big.room(big.plain()) == list(range(1, 24))
    assert big.describe(big.plain()) == "none" and big.describe(r031).startswith("{2: 11, 4: 11")


def test_moves_keep_shape_and_are_seeded():
    s = SPACE.uniform(4, 2)
    for name, move in MOVES.items():
        a = move(s, random.Random(3))
        assert a == move(s, random.Random(3)), name  # same RNG state, same move
        req, how, focus = a
        assert len(req) == SPACE.depth and min(req) >= 0 and req[0] == 0 and how
        assert all(1 <= j < SPACE.depth for j in focus)
    req, how, _ = crossover(SPACE.uniform(4, 2), SPACE.uniform(3, 1), random.Random(1))
    cut = int(how.split()[-1])
    assert req[:cut] == list(SPACE.uniform(4, 2)[:cut]) and req[cut:] == list(SPACE.uniform(3, 1)[cut:])


# ---------------------------------------------------------------- timing model


def test_prediction_is_plain_plus_block_differences_and_merges():
    timing = TableTiming(SPACE, block_ms, lambda n: 0.01 * n, PLAIN_MS)
    s = SPACE.canonical([0, 0, 10, 0, 0, 5] + [0] * 6)  # 65 -> 55 before layer 2 -> 50 before layer 5
    expect = PLAIN_MS + 3 * (block_ms(55) - block_ms(65)) + 7 * (block_ms(50) - block_ms(65)) + 0.01 * 65 + 0.01 * 55
    assert timing.predict(s) == pytest.approx(expect)
    timing.alpha = 0.5
    assert timing.predict(s) == pytest.approx(PLAIN_MS + 0.5 * (expect - PLAIN_MS))
    assert set(timing.blocks) == {65, 55, 50} and set(timing.merges) == {65, 55}  # measured once each


# ---------------------------------------------------------------- repair and surrogate


def test_repair_lands_just_above_the_goal():
    search, timing, _ = make(1.3)
    search.plain_start = timing.measure_plain()
    search.goal = 1.3
    for seed in range(5):
        search.rng = random.Random(seed)
        s = search.repair(SPACE.canonical([0, 3] + [0] * 10), focus=[7])
        assert search.speed(s) >= 1.3
        for i in range(1, SPACE.depth):  # minimal: one token fewer anywhere misses the goal
            if s[i]:
                t = SPACE.canonical([r - (k == i) for k, r in enumerate(s)])
                assert search.speed(t) < 1.3
    search.goal = 50.0
    assert search.repair(SPACE.plain()) is None  # out of reach


def test_surrogate_recovers_linear_damage_and_proposes_a_feasible_schedule():
    rng = random.Random(0)
    w = np.array([0.0] + [math.exp(-i / 4) / 100 for i in range(1, SPACE.depth)])
    scheds = [SPACE.canonical([0] + [rng.randint(0, 6) for _ in range(SPACE.depth - 1)]) for _ in range(80)]
    fit = fit_damage(scheds, [float(np.dot(w, s)) for s in scheds])
    assert fit[0] == 0 and np.allclose(fit, w, rtol=0.05, atol=2e-4)
    assert fit_damage(scheds[:2], [0.1, 0.2]) is None
    timing = TableTiming(SPACE, block_ms, lambda n: 0.01, PLAIN_MS)
    speed = lambda s: PLAIN_MS / timing.predict(s)  # noqa: E731
    s = propose(SPACE, speed, 1.3, w, random.Random(0))
    assert speed(s) >= 1.3
    best_uniform = min((SPACE.uniform(n, k) for n in range(1, 33) for k in (1, 2, 3)
                        if speed(SPACE.uniform(n, k)) >= 1.3), key=true_loss)
    assert true_loss(s) < true_loss(best_uniform)  # the surrogate's optimum beats every uniform schedule
    assert propose(SPACE, speed, 50.0, w, random.Random(0)) is None


# ---------------------------------------------------------------- Pareto set


def _cand(i, speed, agreement, kl=0.0):
    return Candidate(i, (0,), "", 1.0, speed, {"agreement": agreement, "kl": kl, "top1": None})


def test_pareto_front_by_hand():
    cands = [_cand(0, 1.0, 1.0), _cand(1, 1.2, 0.9), _cand(2, 1.1, 0.85), _cand(3, 1.3, 0.9), _cand(4, 1.5, 0.5),
             _cand(5, 1.5, 0.5, kl=0.1)]
    assert pareto_front(cands, "agreement") == [0, 3, 4]  # 1 and 2 are beaten by 3; 5 by 4 (same, lower KL)
    assert pareto_front(cands, "kl") == [4]  # 4 is fastest with the lowest KL (0.0 ties with 0..3, faster)


def test_search_pareto_set_matches_brute_force():
    res = make(1.3, max_evals=30)[0].run()
    by_index = {c.index: c for c in res.candidates}
    for c in res.candidates:
        beaten = any(o.predicted_speedup >= c.predicted_speedup and o.quality["agreement"] >= c.quality["agreement"]
                     and -o.quality["kl"] >= -c.quality["kl"] and (o.predicted_speedup, o.quality["agreement"], -o.quality["kl"])
                     != (c.predicted_speedup, c.quality["agreement"], -c.quality["kl"]) for o in res.candidates)
        assert (c.index in res.pareto) == (not beaten), c.index
    assert by_index[0].marks == ["none"] and 0 in res.pareto  # the plain model: slowest, perfect


# ---------------------------------------------------------------- whole searches


def test_same_seed_same_search_and_another_seed_another():
    a, b, c = (make(1.3, seed=s)[0].run() for s in (0, 0, 1))
    assert [(x.schedule, x.origin) for x in a.candidates] == [(x.schedule, x.origin) for x in b.candidates]
    assert a.best.schedule == b.best.schedule and a.pareto == b.pareto
    assert [x.schedule for x in a.candidates] != [x.schedule for x in c.candidates]


def test_found_schedule_meets_the_target_and_beats_uniform():
    search, timing, _ = make(1.3, alpha=0.9, max_evals=40)
    res = search.run()
    assert res.status == "found" and res.alpha == pytest.approx(0.9)  # calibrated on one whole timing
    goal = 1.3 * 1.01
    assert res.best.measured_speedup >= goal
    assert PLAIN_MS / (PLAIN_MS + 0.9 * timing.savings_ms(res.best.schedule)) >= goal  # the fake truth
    uniform = [c for c in res.candidates if c.origin.startswith("uniform") and c.predicted_speedup >= goal]
    assert uniform and all(res.best.quality["agreement"] >= u.quality["agreement"] for u in uniform)
    assert res.best.quality["agreement"] > max(u.quality["agreement"] for u in uniform)  # the search found better


def test_optimistic_predictions_are_refitted_at_confirmation():
    # after calibration the whole models save 20% less than predicted: the first finalists miss
    search, timing, _ = make(1.2, alpha=0.9, max_evals=25)
    real = timing._whole_fn
    calls = {"n": 0}

    def drifting(s):
        calls["n"] += 1
        return real(s) if calls["n"] <= 2 else PLAIN_MS + 0.72 * timing.savings_ms(s)

    timing._whole_fn = drifting
    res = search.run()
    assert res.status == "found" and res.best.measured_speedup >= 1.2 * 1.01
    assert res.alpha < 0.85  # re-fitted on the whole timings
    assert sum(w["why"] == "confirm" for w in res.whole_timings) > 3  # more than the first 3 finalists


def test_time_budget_stops_the_search():
    search, _, clock = make(1.3, budget=15.0, max_evals=None)
    res = search.run()
    assert res.stopped.startswith("time budget") and res.status == "found"
    assert clock.t <= 15.0 + 1.0 and res.evals <= 16


def test_max_evals_and_compared_recipes():
    compare = {"r031": SPACE.uniform(8, 2), "r042": SPACE.uniform(11, 2)}
    res = make(1.12, max_evals=20, compare=compare)[0].run()
    assert res.evals == 20 and res.stopped.startswith("max evaluations")
    names = [c["recipe"] for c in res.comparisons]
    assert names == ["r031", "r042"]
    for cmp in res.comparisons:
        rc = res.candidates[cmp["index"]]
        assert rc.marks == [cmp["recipe"]] and rc.measured_speedup is not None
        if cmp["rival"] is not None:
            rival = res.candidates[cmp["rival"]]
            assert rival.measured_speedup >= rc.measured_speedup
            assert cmp["rival_better"] == (rival.quality["agreement"] > rc.quality["agreement"]
                                           or (rival.quality["agreement"] == rc.quality["agreement"]
                                               and rival.quality["kl"] < rc.quality["kl"]))


def test_unreachable_target_says_so_with_the_fastest():
    res = make(5.0)[0].run()
    assert res.status == "unreachable" and res.best is None
    fastest = res.fastest()
    assert fastest.schedule == SPACE.fastest() and fastest.measured_speedup < 5.0


def test_latency_target_becomes_a_speedup():
    res = make(latency_ms=PLAIN_MS / 1.2, max_evals=15)[0].run()
    assert res.required_speedup == pytest.approx(1.2)
    assert res.status == "found" and res.best.measured_ms <= PLAIN_MS / 1.2 / 1.01


def test_target_recipe_speed_is_measured_then_beaten_on_quality():
    r031 = SPACE.uniform(8, 2)  # the CIFAR-10 r031: num_prune 8 every 2nd layer
    search, timing, _ = make(target_schedule=r031, max_evals=30, compare={"r031": r031})
    res = search.run()
    assert res.required_speedup == pytest.approx(PLAIN_MS / (PLAIN_MS + 0.9 * timing.savings_ms(r031)))
    assert res.whole_timings[0]["why"] == "target"
    assert res.status == "found" and res.best.measured_speedup >= res.required_speedup * 1.01
    cmp = res.comparisons[0]
    assert cmp["rival_better"] and res.candidates[cmp["rival"]].quality["agreement"] > res.candidates[cmp["index"]].quality["agreement"]
