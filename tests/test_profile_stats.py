"""How a profile measures, on known answers: the spread of timings, the within-noise rules, the
time budget that sizes the number of timed calls, and the CPU / CUDA defaults."""

from __future__ import annotations

import pytest
import torch

from compressor.errors import RmeetoError
from compressor.profile import settings as settings_mod
from compressor.profile import timing
from compressor.profile.report import to_markdown, to_table
from compressor.profile.settings import DEVICE_DEFAULTS, ProfileSettings, auto_threads
from compressor.profile.stats import iqr_overlap, latencies_within_noise, share_within_noise, spread


def test_spread_of_known_values():
    s = spread([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"]) == (3.0, 2.0, 4.0, 1.0, 5.0)
    assert s["p90"] == pytest.approx(4.6)
    with pytest.raises(ValueError):
        spread([])


def test_overlapping_iqrs_are_within_noise():
    assert iqr_overlap((1, 2), (2, 3)) and iqr_overlap((1, 5), (2, 3)) and not iqr_overlap((1, 2), (2.1, 3))
    a = {"latency_ms_q1": 10.0, "latency_ms_q3": 11.0}
    assert latencies_within_noise(a, {"latency_ms_q1": 10.8, "latency_ms_q3": 12.0}) is True
    assert latencies_within_noise(a, {"latency_ms_q1": 11.2, "latency_ms_q3": 12.0}) is False
    assert latencies_within_noise(a, {"latency_ms_q1": None, "latency_ms_q3": None}) is None
    assert share_within_noise(spread([0.01, 0.10, 0.02, 0.15])) is True  # calls disagree by more than the share
    assert share_within_noise(spread([0.10, 0.11, 0.09, 0.10])) is False


class _Clock:
    """A fake perf_counter: every forward call takes ``step`` seconds."""

    def __init__(self, step: float):
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        return self.t

    def run(self):
        self.t += self.step


def test_budget_sizes_the_timed_calls(monkeypatch):
    clock = _Clock(0.1)
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    runner = timing.Runner(clock.run, device="cpu")
    calls = []
    r = timing.measure(runner, 2, warmup=1, repeats=30, budget_s=1.0, on_call=lambda i, n: calls.append((i, n)))
    assert r["repeats"] == 10  # 1 s of 0.1 s calls
    assert calls == [(i, 11) for i in range(1, 12)]
    assert r["latency_ms_median"] == pytest.approx(100.0) and r["throughput"] == pytest.approx(20.0)
    assert timing.measure(runner, 2, warmup=1, repeats=30, budget_s=0.05)["repeats"] == 3  # never fewer than 3
    assert timing.measure(runner, 2, warmup=1, repeats=30, budget_s=100.0)["repeats"] == 30  # never more than asked
    assert timing.measure(runner, 2, warmup=0, repeats=30, budget_s=0.5)["repeats"] == 5  # judged from the first call
    assert timing.measure(runner, 2, warmup=2, repeats=7)["repeats"] == 7  # no budget: exactly repeats


def test_cpu_defaults_are_sized_to_the_device(monkeypatch):
    monkeypatch.setattr(settings_mod, "auto_threads", lambda: (1, "busy"))
    s = ProfileSettings(device="cpu").resolved()
    assert (s.batch_sizes, s.backends, s.overhead, s.warmup) == ((1, 8), ("eager",), ("hooks",), 1)
    assert (s.repeats, s.time_budget_s, s.threads, s.dtype) == (30, 45.0, 1, "fp32")
    fixed = ProfileSettings(device="cpu", repeats=5, threads=2).resolved()
    assert (fixed.repeats, fixed.time_budget_s, fixed.threads) == (5, 0.0, 2)  # explicit repeats: no budget
    cuda = ProfileSettings()._with_device_defaults("cuda")
    assert (cuda.batch_sizes, cuda.backends, cuda.overhead) == ((1, 8, 64, 128), ("eager", "graph"), ("sliced", "hooks"))
    assert (cuda.warmup, cuda.repeats, cuda.time_budget_s) == (5, 30, 0.0) == tuple(
        DEVICE_DEFAULTS["cuda"][k] for k in ("warmup", "repeats", "time_budget_s"))
    with pytest.raises(RmeetoError, match="threads >= 1"):
        ProfileSettings(device="cpu", threads=0).resolved()


def test_auto_threads_follow_the_load(monkeypatch):
    monkeypatch.setattr(settings_mod.os, "sched_getaffinity", lambda _: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(settings_mod.os, "getloadavg", lambda: (3.5, 3.0, 2.0))
    threads, why = auto_threads()
    assert threads == 1 and "load 3.5 on 4 cores" in why and "--threads" in why
    monkeypatch.setattr(settings_mod.os, "getloadavg", lambda: (0.3, 0.2, 0.1))
    assert auto_threads() == (torch.get_num_threads(), "")


def _report(speedup_noise: bool, overhead_noise: bool) -> dict:
    row = {"backend": "eager", "batch_size": 2, "status": "ok", "note": "", "throughput": 0.0527, "latency_ms_median": 38000.0,
           "latency_ms_q1": 37000.0, "latency_ms_q3": 39500.0, "latency_ms_p90": 40000.0, "peak_memory_mb": None,
           "repeats": 4, "speedup": 1.031, "speedup_within_noise": speedup_noise}
    hooks = {"method": "hooks", "backend": "eager", "batch_size": 2, "merge_ms": 300.0, "forward_ms": 38000.0,
             "forward_ms_q1": 37000.0, "forward_ms_q3": 39500.0, "overhead_fraction": -0.106,
             "overhead_fraction_q1": -0.2, "overhead_fraction_q3": 0.3, "within_noise": overhead_noise}
    model = {"name": "m", "role": "compressed", "recipe": "r031", "params": 1, "flops": {"gflops": 1.0, "gflops_paper": 1.0,
             "reduction": 0.1}, "tokens_per_layer": [17, 9], "merges": [1], "reduction_ratio": 0.2, "accuracy": None,
             "timings": [row], "merge_overhead": [hooks], "notes": []}
    return {"hardware": {"device_name": "cpu", "cpu_count": 2, "torch": "x", "cuda": None, "torch_threads": 1},
            "settings": {"dtype": "fp32", "op_backend": "ref", "batch_sizes": [2], "backends": ["eager"], "warmup": 1,
                         "repeats": 30, "time_budget_s": 45.0, "threads": 1},
            "created": "now", "baseline": "base", "models": [model], "methods": {}, "notes": []}


def test_reports_say_within_noise_instead_of_the_number():
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(to_table(_report(True, True)))
    text = console.export_text()
    assert "~x1.03" in text and "noise" in text and "-10.6%" not in text and "0.0527" in text
    md = to_markdown(_report(True, True))
    assert "within noise (measured x1.03)" in md and "within noise (measured -10.6%)" in md
    md = to_markdown(_report(False, False))
    tables = md.split("## Speed")[1].split("## Tokens per layer")[0]
    assert "| x1.03 |" in tables and "-10.6% (hooks)" in tables and "within noise" not in tables


def test_progress_view_prints_each_new_step_with_an_eta_in_logs():
    import io

    from rich.console import Console

    from compressor.cli import _progress

    clock = iter([0.0, 10.0, 20.0])
    buf = io.StringIO()
    with _progress.ProgressView(Console(file=buf, width=200), tty=False, clock=lambda: next(clock)) as view:  # t0 = 0
        view.update("baseline: eager, batch 2", 0.0, 4)  # printed at t=10, no estimate yet
        view.update("baseline: eager, batch 2", 0.5, 4)  # same step: not printed again
        view.update("compressed: eager, batch 2", 1.0, 4)  # t=20: 1 of 4 in 20 s -> 60 s left
    lines = buf.getvalue().splitlines()
    assert lines == ["[0:10] 0/4 baseline: eager, batch 2", "[0:20] 1/4 compressed: eager, batch 2  eta 1:00"]

    with _progress.ProgressView(Console(file=io.StringIO(), force_terminal=True), tty=True) as view:
        view.update("compressed: eager, batch 2", 1.5, 4)
        task = view._progress.tasks[0]
        assert (task.description, task.completed, task.total) == ("compressed: eager, batch 2", 1.5, 4)
