"""The command examples in the docs run: every ```bash block preceded by ``<!-- tested -->``."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from compressor.cli import app
from compressor.models import create_model
from helpers import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "cli.md"]


def _commands(path: Path) -> list[str]:
    text = path.read_text()
    blocks = re.findall(r"<!-- tested -->\s*```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip().startswith("rmeeto ")]


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = create_model("vim_test")
    ns = argparse.Namespace(model="vim_test", nb_classes=10)
    torch.save({"model": model.state_dict(), "args": ns}, tmp_path / "vim_t.pth")
    make_image_folder(tmp_path / "data", train=2, val=1)
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(48, 48, 3, generator=g) * 255).to(torch.uint8).numpy()).save(tmp_path / "img.png")
    monkeypatch.chdir(tmp_path)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(old)


def test_docs_have_tested_examples():
    assert len(_commands(ROOT / "docs" / "cli.md")) >= 8


def test_documented_commands_run(workdir):
    runner = CliRunner()
    commands = [c for p in DOCS for c in _commands(p)]
    for line in commands:
        result = runner.invoke(app, shlex.split(line)[1:])
        assert result.exit_code == 0, f"`{line}` failed:\n{result.output}"
    assert (workdir / "out" / "r031" / "compressed.pt").is_file()
    assert (workdir / "out" / "r031.onnx").is_file()
    assert (workdir / "out" / "report" / "report.json").is_file()
    assert (workdir / "out" / "merges.png").read_bytes()[:4] == b"\x89PNG"
