"""``rmeeto search`` for real on the CPU with a tiny model: timing, scoring, the CLI end to end, and
the found recipe through ``rmeeto compress --retrain-epochs``."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import compressor.search.run as search_run
from compressor.cli import app
from compressor.cli.search import parse_duration
from compressor.errors import RmeetoError
from compressor import load_model
from compressor.models import create_model
from compressor.recipes import load_recipe
from compressor.search import MeasuredTiming, QualityScorer, Space, TableTiming, generated_calibration, load_calibration
from helpers import make_image_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    torch.manual_seed(0)
    model = create_model("vim_test")  # 17 tokens (class token at 8), depth 4, 10 classes
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model="vim_test", nb_classes=10)}, root / "vim_t.pth")
    make_image_folder(root / "data", train=2, val=2)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield root
    torch.set_num_threads(old)


def _space(model):
    return Space(model.cfg.num_tokens, model.cfg.cls_index, model.cfg.depth)


def test_measured_timing_on_cpu(work):
    model = load_model(work / "vim_t.pth")
    space = _space(model)
    t = MeasuredTiming(model, space, batch_size=2, device="cpu", dtype=torch.float32, backend="eager", warmup=1,
                       repeats=2, part_repeats=2)
    plain = t.measure_plain()
    s = space.uniform(4, 2)
    pred = t.predict(s)
    assert plain > 0 and 0 < pred and set(t.blocks) == {17, 13} and set(t.merges) == {17}
    assert t.whole_ms(s) > 0 and [r["what"] for r in t.rows][-1] == "whole {2: 4}"
    with pytest.raises(RmeetoError, match="graph timing needs CUDA"):
        MeasuredTiming(model, space, batch_size=2, device="cpu", dtype=torch.float32, backend="graph")


def test_quality_scorer_plain_is_exact_and_labels_give_top1(work):
    model = load_model(work / "vim_t.pth")
    space = _space(model)
    calib = load_calibration(work / "data", 12, 32, 1.0, num_classes=10, seed=0)
    assert calib.images.shape == (12, 3, 32, 32) and calib.labels is not None and "val" in calib.source
    again = load_calibration(work / "data", 12, 32, 1.0, num_classes=10, seed=0)
    assert torch.equal(again.images, calib.images)  # the subset is seeded
    scorer = QualityScorer(model, space, calib, device="cpu", batch_size=5)
    q = scorer(space.plain())
    assert q["agreement"] == 1.0 and q["kl"] == 0.0 and q["top1"] == pytest.approx(scorer.plain_top1)
    with torch.no_grad():
        ref = model(calib.images).argmax(-1)
    assert scorer.plain_top1 == pytest.approx((ref == calib.labels).float().mean().item())
    merged = scorer(space.fastest())
    assert 0.0 <= merged["agreement"] <= 1.0 and merged["kl"] > 0
    rest = load_calibration(work / "data", 12, 32, 1.0, num_classes=10, seed=0, held_out=True)
    assert len(rest.images) == 20 - 12 and "outside" in rest.source
    every = torch.cat([calib.images, rest.images])
    assert len({tuple(x.flatten()[:8].tolist()) for x in every}) == 20  # disjoint: together, every image once
    unlabelled = load_calibration(work / "data", 4, 32, 1.0, num_classes=7)
    assert unlabelled.labels is None and "no labels" in unlabelled.source
    gen = generated_calibration(6, 3, 32, seed=1)
    assert gen.images.shape == (6, 3, 32, 32) and gen.labels is None and abs(gen.images.std().item() - 1) < 1e-4


def test_parse_duration():
    assert parse_duration("90s") == 90 and parse_duration("10m") == 600 and parse_duration("1.5h") == 5400
    assert parse_duration("45") == 45
    for bad in ("", "10x", "-3m", "0"):
        with pytest.raises(RmeetoError, match="--time-budget"):
            parse_duration(bad)


FAST = ["--device", "cpu", "--batch-size", "2", "--num-images", "8", "--repeats", "2", "--part-repeats", "2",
        "--confirm", "1", "--compare", "r031"]


def test_cli_end_to_end_finds_and_compress_takes_it(work, monkeypatch):
    monkeypatch.chdir(work)
    # x0.5 is met by any schedule on any machine (CPU timings are noisy): the flow, not the speed
    res = runner.invoke(app, ["search", "vim_t.pth", "--target-speedup", "0.5", "--data", "data", "--max-evals", "6",
                              "-o", "out/found.toml", *FAST])
    assert res.exit_code == 0, res.output
    report = json.loads((work / "out" / "found_report" / "report.json").read_text())
    assert report["status"] == "found" and report["objective"] == "top1"  # the folder has the model's 10 classes
    assert (work / "out" / "found_report" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "Every schedule scored" in (work / "out" / "found_report" / "report.md").read_text()
    assert len(report["candidates"]) >= 3 and report["comparisons"][0]["recipe"] == "r031"
    assert report["best"]["measured_speedup"] >= 0.5 * 1.01
    recipe = load_recipe(work / "out" / "found.toml")
    assert recipe.name == "found" and "measured x" in recipe.description
    assert "found #" in res.output and "wrote out/found.toml" in res.output
    res = runner.invoke(app, ["compress", "vim_t.pth", "--recipe", "out/found.toml", "-o", "out/c", "--retrain-epochs", "1",
                              "--data", "data", "--batch-size", "4", "--workers", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    stored = load_model(work / "out" / "c" / "compressed.pt").recipe
    assert stored.merge == recipe.merge and stored.retrain.epochs == 1  # the CLI's overrides are stored too


def test_cli_unreachable_target_is_one_line_naming_the_knob(work, monkeypatch):
    monkeypatch.chdir(work)
    res = runner.invoke(app, ["search", "--model", "vim_test", "--target-speedup", "50", "-o", "out/none.toml", *FAST])
    assert res.exit_code == 1
    err = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "no schedule reaches x50" in err[0] and "lower --target-speedup" in err[0]
    assert "Traceback" not in res.output and not (work / "out" / "none.toml").exists()
    assert json.loads((work / "out" / "none_report" / "report.json").read_text())["status"] == "unreachable"


@pytest.mark.parametrize("args,needle", [
    (["--model", "vim_test"], "give one target"),
    (["--model", "vim_test", "--target-speedup", "1.2", "--target-latency-ms", "3"], "give one target"),
    (["--target-speedup", "1.2"], "either a checkpoint or a model name"),
    (["--model", "vim_test", "--target-speedup", "1.2", "-o", "x.txt"], "is a .toml file"),
    (["--model", "vim_test", "--target-speedup", "1.2", "--time-budget", "soon"], "--time-budget"),
    (["--model", "vim_test", "--target-speedup", "1.2", "--device", "cuda"], None),
    (["--model", "vim_test", "--target-speedup", "1.2", "--objective", "top1"], "needs labelled images"),
    (["--model", "vim_test", "--target-speedup", "1.2", "--compare", "nosuch"], "unknown recipe 'nosuch'"),
    (["--model", "vim_test", "--target-recipe", "nosuch"], "unknown recipe 'nosuch'"),
    (["--model", "vim_test", "--target-recipe", "r031", "--target-speedup", "1.2"], "give one target"),
])
def test_cli_bad_input_is_one_line(work, monkeypatch, args, needle):
    if needle is None:
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        needle = "CUDA is not available"
    monkeypatch.chdir(work)
    res = runner.invoke(app, ["search", *args, "--num-images", "4", "--device" if "--device" not in args else "--seed",
                              "cpu" if "--device" not in args else "0"])
    assert res.exit_code == 1, res.output
    assert needle in res.output and "Traceback" not in res.output


def test_budget_too_small_for_scoring_names_the_knob(work, monkeypatch):
    monkeypatch.chdir(work)
    res = runner.invoke(app, ["search", "--model", "vim_test", "--target-speedup", "1.2", "--time-budget", "0.001s",
                              "-o", "out/x.toml", *FAST])
    assert res.exit_code == 1 and "lower --num-images or raise --time-budget" in res.output


def test_run_search_with_a_table_finds_a_real_schedule_for_compress(work, monkeypatch):
    """The same orchestration with a deterministic timing table: a non-trivial found schedule,
    written as a recipe that ``rmeeto compress`` re-trains like any other."""

    def fake_timing(net, space, **kw):
        plain = 0.2 + space.depth * (1.0 + 0.1 * math.ceil(space.num_tokens / 4))
        return TableTiming(space, lambda n: 1.0 + 0.1 * math.ceil(n / 4), lambda n: 0.005, plain)

    monkeypatch.setattr(search_run, "MeasuredTiming", fake_timing)
    monkeypatch.chdir(work)
    report = search_run.run_search(work / "vim_t.pth", out=work / "out" / "table.toml", data=work / "data", compare=["r014"],
                                   base_recipe="smoke", settings=search_run.SearchSettings(
                                       target_speedup=1.1, device="cpu", num_images=8, max_evals=12, seed=3))
    assert report["status"] == "found" and report["best"]["schedule"]  # merges something
    assert report["best"]["measured_speedup"] >= 1.1 * 1.01
    recipe = load_recipe(work / "out" / "table.toml")
    assert recipe.merge.per_layer and recipe.retrain == load_recipe("smoke").retrain  # --base-recipe's [retrain]
    assert {str(k): v for k, v in recipe.merge.schedule} == report["best"]["schedule"]
    res = runner.invoke(app, ["compress", "vim_t.pth", "--recipe", "out/table.toml", "-o", "out/t", "--retrain-epochs", "1",
                              "--data", "data", "--batch-size", "4", "--workers", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    gm = load_model(work / "out" / "t" / "compressed.pt")
    assert gm.recipe.merge == recipe.merge and [(s.layer, s.r) for s in gm.steps] == list(recipe.merge.schedule)


def test_a_compressed_file_is_searched_on_its_weights_unmerged(work):
    from compressor.convert import convert, save_compressed

    official = load_model(work / "vim_t.pth")
    save_compressed(convert(official, "r031"), work / "c031.pt")
    net, name, source = search_run._plain_model(work / "c031.pt", None, None)
    assert name == "c031" and "unmerged" in source and type(net).__name__ == "VisionMamba"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), official(x), rtol=0, atol=0)
