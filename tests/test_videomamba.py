"""VideoMamba image models through loader, converter, re-training and export (issue: second family)."""

from __future__ import annotations

import argparse

import pytest
import torch
from typer.testing import CliRunner

from compressor.cli import app
from compressor.convert import convert
from compressor.merge import MergeConfig
from compressor import load_model
from compressor.models import create_model
from helpers import make_image_folder, official_as_user_file, record_tokens


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    f, obj = official_as_user_file("videomamba_official_depth8.pt", tmp_path_factory.mktemp("vm"), "videomamba_t.pth")
    return load_model(f, family="videomamba"), obj


@pytest.mark.parametrize("merge,tokens", [
    (MergeConfig(num_prune=5), [197, 197, 192, 192, 187, 187, 182, 182]),
    (MergeConfig(num_prune=11), [197, 197, 186, 186, 175, 175, 164, 164]),
    (MergeConfig(num_prune=11, mode="prune"), [197, 197, 186, 186, 175, 175, 164, 164]),
], ids=["r5", "r11", "prune11"])
def test_official_videomamba_converts_with_the_class_token_first(official, merge, tokens):
    model, obj = official
    gm = convert(model, merge)
    out, seen = record_tokens(gm, obj["images"][:2])
    assert seen == tokens
    assert all(s.cls_in == 0 and s.cls_out == 0 for s in gm.steps) and gm.readout.index == 0
    assert torch.isfinite(out).all()


def test_official_videomamba_logits(official):
    model, obj = official
    with torch.no_grad():
        out = model(obj["images"])
    assert ((out - obj["logits"]).abs().max() / obj["logits"].abs().max()).item() < 1e-4


def test_paper_videomamba_ti_has_no_final_merge_to_76():
    from compressor.merge import merge_schedule
    from compressor.recipes import load_recipe

    steps = merge_schedule(load_recipe("paper-videomamba-ti").merge, 197, 0, 24)
    assert steps[-1].tokens_out == 142 and all(s.cls_out == 0 for s in steps)


def test_videomamba_retrains_and_exports_through_the_cli(tmp_path):
    torch.manual_seed(0)
    model = create_model("videomamba_test")
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model="videomamba_test")}, tmp_path / "vm.pth")
    make_image_folder(tmp_path / "data", train=2, val=1)
    runner = CliRunner()
    r = runner.invoke(app, ["compress", str(tmp_path / "vm.pth"), "--family", "videomamba", "--recipe", "smoke",
                            "--retrain-epochs", "1", "--data", str(tmp_path / "data"), "-o", str(tmp_path / "out"),
                            "--batch-size", "8", "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    gm = load_model(tmp_path / "out" / "compressed.pt")
    assert gm.cfg.family == "videomamba" and gm.readout.index == 0 and gm.steps
    r = runner.invoke(app, ["export", str(tmp_path / "out" / "compressed.pt"), "--onnx", str(tmp_path / "vm.onnx")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "vm.onnx").stat().st_size > 0
