"""CPU tests of compressor.profile: the report of a compressed ``vim_test`` model against its
baseline (every JSON field, sane numbers, plots, FLOPs), ``--recipes`` mode on an official-layout
checkpoint, the sliced stand-in used for merge overhead, and the ``rmeeto profile`` command.
Tiny batch sizes and repeats: these check the plumbing, not the speed."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import compressor.cli.profile  # noqa: F401  (registers the command, should cli/__init__ not yet)
from compressor.cli import app
from compressor.convert import convert, save_compressed
from compressor.errors import RmeetoError
from compressor.merge.module import TokenMerge
from compressor.models import create_model
from compressor.profile import ProfileInterrupted, ProfileSettings, load_targets, run_profile
from compressor.profile import run as profile_run
from compressor.profile.overhead import TokenSlice, hook_overhead, sliced_variant
from compressor.profile.plots import throughput_figure
from compressor.profile.report import to_markdown
from compressor.profile.stats import latencies_within_noise

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = dict(device="cpu", batch_sizes=(1, 2), warmup=1, repeats=3, eval_workers=0, eval_batch_size=8)


def _image_folder(root, classes=10, per_class=1):
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        d = root / "val" / f"class{c:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("official") / "vim_test.pth"
    torch.save({"model": create_model("vim_test").state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def compressed_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    gm = convert(create_model("vim_test").eval(), "r031")
    path = tmp_path_factory.mktemp("compressed") / "compressed.pt"
    save_compressed(gm, path, extra={"source_checkpoint": "official.pth"})
    return path


@pytest.fixture(scope="module")
def profiled(compressed_ckpt, tmp_path_factory):
    """One profile run shared by the report tests: compressed model + baseline, with data."""
    root = tmp_path_factory.mktemp("profile")
    data = _image_folder(root / "data")
    calls = []
    report = run_profile(compressed_ckpt, out_dir=root / "out", data=data, backends=("eager", "graph"),
                         overhead=("sliced", "hooks"), progress=lambda *a: calls.append(a), **TINY)
    report["_progress"] = calls
    return report, root / "out"


# --------------------------------------------------------------------------------------------
# the report


def test_report_json_matches_the_run(profiled):
    report, out = profiled
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["rmeeto_profile"] == 2 and on_disk["interrupted"] is False
    assert [m["name"] for m in on_disk["models"]] == ["baseline", "compressed"]
    assert [m["role"] for m in on_disk["models"]] == ["baseline", "compressed"] and on_disk["baseline"] == "baseline"
    assert on_disk["models"][1]["timings"] == json.loads(json.dumps(report["models"][1]["timings"]))  # the same numbers
    hw = on_disk["hardware"]
    assert hw["device"] == "cpu" and hw["cpu_count"] == os.cpu_count() and hw["torch"] == torch.__version__
    assert hw["torch_threads"] == on_disk["settings"]["threads"] >= 1
    st = on_disk["settings"]
    assert (st["dtype"], st["batch_sizes"], st["backends"], st["op_backend"]) == ("fp32", [1, 2], ["eager", "graph"], "ref")
    assert (st["warmup"], st["repeats"], st["time_budget_s"]) == (1, 3, 0.0)  # explicit repeats: exactly that many
    assert {"timing", "noise", "memory", "merge_overhead", "flops", "accuracy"} <= set(on_disk["methods"])
    assert {k: Path(v).name for k, v in on_disk["outputs"].items()} == {
        "json": "report.json", "markdown": "report.md", "plot_throughput": "throughput.png",
        "plot_tokens": "tokens_per_layer.png", "plot_accuracy": "accuracy.png"}
    assert all(Path(v).is_file() for v in on_disk["outputs"].values())
    for m in on_disk["models"]:
        assert m["params"] == sum(p.numel() for p in create_model("vim_test").parameters())  # merges add no weights
        assert m["arch"]["depth"] == len(m["tokens_per_layer"]) == 4
        assert m["tokens_per_layer"][0] == m["arch"]["tokens"] == 17
        assert m["reduction_ratio"] == pytest.approx(sum(17 - n for n in m["tokens_per_layer"]) / (4 * 17))


def test_progress_reaches_the_total_in_order(profiled):
    calls = profiled[0]["_progress"]
    done = [c[1] for c in calls]
    total = {c[2] for c in calls}
    # baseline: 2 timings (graph skipped on the CPU is not counted), compressed: 2 + 2 sliced + 2 hooks, 2 evaluations
    assert total == {10} and done == sorted(done) and done[-1] == 10
    assert any("merge hooks" in c[0] for c in calls) and any("accuracy" in c[0] for c in calls)


def test_timings_are_sane(profiled):
    report, _ = profiled
    base = {r["batch_size"]: r for r in report["models"][0]["timings"] if r["backend"] == "eager"}
    for m in report["models"]:
        eager = [r for r in m["timings"] if r["backend"] == "eager"]
        assert [r["batch_size"] for r in eager] == [1, 2]
        for r in eager:
            assert r["status"] == "ok" and r["device"] == "cpu" and r["repeats"] == 3
            assert r["throughput"] == pytest.approx(r["batch_size"] / r["latency_ms_median"] * 1e3)
            assert 0 < r["latency_ms_min"] <= r["latency_ms_q1"] <= r["latency_ms_median"] <= r["latency_ms_q3"]
            assert r["latency_ms_q3"] <= r["latency_ms_p90"] <= r["latency_ms_max"]
            assert r["speedup_within_noise"] is (None if m["role"] == "baseline" else latencies_within_noise(r, base[r["batch_size"]]))
            assert r["peak_memory_mb"] is None  # not measured on the CPU
            assert r["speedup"] is not None and r["speedup"] > 0
            if m["role"] == "baseline":
                assert r["speedup"] == pytest.approx(1.0)
        graph = [r for r in m["timings"] if r["backend"] == "graph"]
        assert graph and all(r["status"] == "skipped" and "CUDA" in r["note"] and r["throughput"] is None for r in graph)
    assert any(n.startswith("graph: skipped") for n in report["notes"])


def test_compressed_has_fewer_flops_and_tokens(profiled):
    base, comp = profiled[0]["models"]
    assert comp["recipe"] == "r031" and base["recipe"] == "none"
    assert comp["flops"]["gflops"] < base["flops"]["gflops"]
    assert comp["flops"]["gflops_paper"] < base["flops"]["gflops_paper"]
    assert 0 < comp["flops"]["reduction"] < 1 and base["flops"]["reduction"] == 0
    assert comp["tokens_per_layer"][-1] < base["tokens_per_layer"][-1] == 17
    assert comp["merges"] == [{"layer": 2, "tokens_in": 17, "tokens_out": 9, "r": 8}] and base["merges"] == []
    assert comp["params"] == base["params"]  # merging adds no weights
    assert any("official.pth" in n for n in comp["notes"])


def test_merge_overhead_rows(profiled):
    base, comp = profiled[0]["models"]
    assert base["merge_overhead"] == []
    sliced = [r for r in comp["merge_overhead"] if r["method"] == "sliced"]
    hooks = [r for r in comp["merge_overhead"] if r["method"] == "hooks"]
    assert [(r["backend"], r["batch_size"]) for r in sliced] == [("eager", 1), ("eager", 2)]  # graph skipped on CPU
    for r in sliced:
        assert r["merged_ms"] > 0 and r["sliced_ms"] > 0 and r["sliced_speedup"] > 0
        assert r["overhead_fraction"] == pytest.approx((r["merged_ms"] - r["sliced_ms"]) / r["merged_ms"])
        assert r["sliced_ms_q1"] <= r["sliced_ms"] <= r["sliced_ms_q3"] and isinstance(r["within_noise"], bool)
    assert [r["batch_size"] for r in hooks] == [1, 2]
    for r in hooks:
        assert 0 < r["overhead_fraction"] < 1 and 0 < r["merge_ms"] < r["forward_ms"] and r["repeats"] == 3
        assert r["overhead_fraction_q1"] <= r["overhead_fraction"] <= r["overhead_fraction_q3"]
        assert r["within_noise"] == (r["overhead_fraction_q3"] - r["overhead_fraction_q1"] > r["overhead_fraction"])


def test_accuracy_on_data(profiled):
    for m in profiled[0]["models"]:
        acc = m["accuracy"]
        assert acc["images"] == 10 and acc["classes"] == 10 and acc["dtype"] == "fp32"
        assert 0 <= acc["top1"] <= acc["top5"] <= 100
        assert acc["fp32"] == {"top1": acc["top1"], "top5": acc["top5"], "loss": acc["loss"]}  # timed in fp32


def test_accuracy_in_the_timed_dtype_beside_fp32(compressed_ckpt, tmp_path):
    data = _image_folder(tmp_path / "data")
    report = run_profile(compressed_ckpt, data=data, dtype="bf16", overhead=(),
                         **{**TINY, "batch_sizes": (1,), "repeats": 1})
    for m in report["models"]:
        acc = m["accuracy"]
        assert acc["dtype"] == "bf16" and set(acc["fp32"]) == {"top1", "top5", "loss"}
        assert acc["loss"] != acc["fp32"]["loss"]  # evaluated twice: bf16 rounding moves the loss
        assert acc["loss"] == pytest.approx(acc["fp32"]["loss"], rel=0.05)
    md = to_markdown(report)
    assert "top-1 (bf16)" in md and "top-1 (fp32)" in md


def test_plots_and_markdown_written(profiled):
    report, out = profiled
    for name in ("throughput.png", "tokens_per_layer.png", "accuracy.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    md = (out / "report.md").read_text()
    for heading in ("## Models", "## Speed", "## Merge overhead", "## Tokens per layer", "## Methods", "## Notes"):
        assert heading in md
    assert "| compressed | eager | 2 |" in md and "![throughput](throughput.png)" in md
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_throughput_plot_starts_at_zero_with_error_bars(profiled):
    report, _ = profiled
    fig = throughput_figure(report)
    (ax,) = fig.axes  # one panel: graph produced no numbers on the CPU
    assert ax.get_title().startswith("throughput, eager") and "images / s" in ax.get_ylabel()
    assert ax.get_ylim()[0] == 0
    bars = [c for c in ax.containers if c.has_yerr]
    assert len(bars) == 2  # one per model
    for model, bar in zip(report["models"], bars):
        seg = bar.lines[2][0].get_segments()  # one vertical segment per batch size
        rows = sorted((r for r in model["timings"] if r["backend"] == "eager"), key=lambda r: r["batch_size"])
        for (lo, hi), r in zip(((s[0][1], s[1][1]) for s in seg), rows):
            assert lo == pytest.approx(r["batch_size"] / r["latency_ms_q3"] * 1e3)
            assert hi == pytest.approx(r["batch_size"] / r["latency_ms_q1"] * 1e3)


def _interrupt_after(monkeypatch, n: int) -> None:
    """Ctrl-C during the ``n+1``-th timing series."""
    real, seen = profile_run.time_backend, []

    def timed(*a, **kw):
        if len(seen) == n:
            raise KeyboardInterrupt
        seen.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(profile_run, "time_backend", timed)


def test_ctrl_c_writes_a_partial_report(compressed_ckpt, tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, 3)  # baseline bs 1 and 2, compressed bs 1; then Ctrl-C
    with pytest.raises(ProfileInterrupted) as info:
        run_profile(compressed_ckpt, out_dir=tmp_path, **{**TINY, "overhead": ()})
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["interrupted"] is True and info.value.report["interrupted"] is True
    base, comp = on_disk["models"]
    assert [r["batch_size"] for r in base["timings"]] == [1, 2] and [r["batch_size"] for r in comp["timings"]] == [1]
    assert comp["timings"][0]["speedup"] > 0  # what was measured is compared
    assert on_disk["notes"][0].startswith("interrupted (Ctrl-C) at 3 of 4 series")
    assert "(interrupted: partial)" in (tmp_path / "report.md").read_text()


def test_cli_ctrl_c_exits_130_with_the_partial_table(compressed_ckpt, tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, 1)
    out = tmp_path / "rep"
    result = CliRunner().invoke(app, ["profile", str(compressed_ckpt), "--device", "cpu", "--batch-sizes", "1",
                                      "--repeats", "1", "--warmup", "0", "-o", str(out)])
    assert result.exit_code == 130, result.output
    assert "INTERRUPTED" in result.output and "partial" in result.output
    assert json.loads((out / "report.json").read_text())["interrupted"] is True


# --------------------------------------------------------------------------------------------
# model selection


def test_recipes_mode_one_entry_per_recipe(official_ckpt, tmp_path):
    report = run_profile(official_ckpt, recipes=["r014", "r031"], out_dir=tmp_path, backends=("eager",),
                         overhead=(), **{**TINY, "batch_sizes": (1,), "repeats": 1})
    names = [m["name"] for m in report["models"]]
    assert names == ["baseline", "r014", "r031"]
    assert [m["role"] for m in report["models"]] == ["baseline", "training-free", "training-free"]
    g = [m["flops"]["gflops"] for m in report["models"]]
    assert g[0] > g[1] > g[2]
    assert all(m["timings"][0]["speedup"] > 0 for m in report["models"])
    assert (tmp_path / "report.json").exists()


def test_baseline_of_compressed_is_same_weights_unmerged(compressed_ckpt):
    base, comp = load_targets(compressed_ckpt)
    assert len(list(base.module.steps)) == 0 and len(list(comp.module.steps)) == 1
    for k, v in comp.module.state_dict().items():
        assert torch.equal(v, base.module.state_dict()[k]), k


def test_model_name_and_bad_selections():
    (t,) = load_targets(model="vim_test")
    assert t.role == "baseline" and "random weights" in t.source
    with pytest.raises(RmeetoError, match="not both"):
        load_targets("x.pth", model="vim_test")
    with pytest.raises(RmeetoError, match="does not exist"):
        load_targets("missing.pth")
    with pytest.raises(RmeetoError, match="unknown backend 'tensorrt'"):
        ProfileSettings(device="cpu", backends=("eager", "tensorrt")).resolved()
    with pytest.raises(RmeetoError, match="batch sizes"):
        ProfileSettings(device="cpu", batch_sizes=(0,)).resolved()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(RmeetoError, match="--device cpu"):
        ProfileSettings(device="cuda").resolved()


# --------------------------------------------------------------------------------------------
# merge overhead stand-in


def test_sliced_variant_keeps_token_counts_and_shares_weights():
    gm = convert(create_model("vim_test").eval(), "r031")
    sliced = sliced_variant(gm)
    assert [type(m) for m in sliced.modules() if isinstance(m, (TokenMerge, TokenSlice))] == [TokenSlice]
    assert any(isinstance(m, TokenMerge) for m in gm.modules())  # the original is untouched
    assert sliced.get_submodule("layers.3") is gm.get_submodule("layers.3")
    seen = {}
    hooks = [sliced.get_submodule(f"layers.{i}").register_forward_hook(
        lambda m, a, out, i=i: seen.__setitem__(i, out[0].shape[1])) for i in range(4)]
    with torch.no_grad():
        assert sliced(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    for h in hooks:
        h.remove()
    assert [seen[i] for i in range(4)] == [17, 17, 9, 9]


def test_hook_overhead_none_without_merges():
    gm = convert(create_model("vim_test").eval(), "none")
    assert hook_overhead(gm, torch.randn(1, 3, 32, 32), warmup=0, repeats=1) is None


# --------------------------------------------------------------------------------------------
# the command


def _lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.strip()]


def test_cli_profile_runs(tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, [
        "profile", "--model", "vim_test", "--recipes", "r031", "--device", "cpu", "--batch-sizes", "1",
        "--backends", "eager", "--warmup", "0", "--repeats", "1", "--overhead", "none", "-o", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert "r031" in result.output and "baseline" in result.output and "wrote" in result.output
    report = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["baseline", "r031"]


@pytest.mark.parametrize("args, message", [
    (["profile", "{tmp}/missing.pth", "--device", "cpu"], "does not exist"),
    (["profile", "--model", "vim_test", "--device", "cpu", "--backends", "eager,warp"], "unknown backend 'warp'"),
    (["profile", "--model", "vim_test", "--device", "cpu", "--batch-sizes", "1,x"], "comma-separated integers"),
    (["profile", "--device", "cpu"], "checkpoint or a model name"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["-o", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = _lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not (tmp_path / "out").exists()
