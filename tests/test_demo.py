"""``rmeeto demo``: the whole pipeline (generated data, base training, compress + re-train,
ONNX export, profile) on the tiny model, and its one-line error for a non-empty output folder."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")

from compressor.cli import app  # noqa: E402


def test_demo_tiny_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--size", "tiny", "--epochs", "3", "-o", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    files = {
        "base": out / "base.pth",
        "compressed": out / "compressed" / "compressed.pt",
        "onnx": out / "compressed.onnx",
        "report": out / "profile" / "report.json",
    }
    for path in files.values():
        assert path.is_file() and path.stat().st_size > 0, path
        assert str(path) in result.output.replace("\n", ""), path
    assert (out / "data" / "train").is_dir() and (out / "data" / "val").is_dir()

    # base.pth is in the official layout and loads as a plain Vision Mamba
    import argparse

    from compressor import load_model
    from compressor.models.checkpoint import read_checkpoint
    from compressor.models.vim import VisionMamba

    obj = read_checkpoint(files["base"])
    assert set(obj) == {"model", "args"} and isinstance(obj["args"], argparse.Namespace)
    assert isinstance(load_model(files["base"]), VisionMamba)

    report = json.loads(files["report"].read_text())
    base, comp = report["models"]
    assert base["accuracy"] is not None and comp["accuracy"] is not None
    assert comp["merges"] and not base["merges"]
    assert {r["batch_size"] for r in comp["timings"]} == {1, 8}
    assert "training-free" in result.output and "re-trained" in result.output


def test_demo_refuses_non_empty_out(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something.txt").write_text("x")
    result = CliRunner().invoke(app, ["demo", "--size", "tiny", "-o", str(out)], terminal_width=200)
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not empty" in lines[0] and "-o" in lines[0], result.output
    assert sorted(p.name for p in out.iterdir()) == ["something.txt"]


def test_demo_unknown_size_is_one_line(tmp_path):
    from compressor.demo import run_demo
    from compressor.errors import RmeetoError

    with pytest.raises(RmeetoError, match="unknown size"):
        run_demo(tmp_path / "x", size="huge")
    assert not (tmp_path / "x").exists()
