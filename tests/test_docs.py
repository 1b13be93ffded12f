"""The docs agree with the command line.

- Every ```bash block preceded by ``<!-- tested -->`` runs, each command with exit code 0, and
  writes what it says.
- docs/cli.md has a section per command whose option list ("Options: ..." to the end of the
  section, or "No options.") is exactly the options the command's ``--help`` shows, and every
  command has a section.
- Every other ``rmeeto ...`` line in README.md and docs/ (examples on files a test does not have)
  names a real command and only options its ``--help`` lists.
"""

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
CLI_MD = ROOT / "docs" / "cli.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = [("info",), ("models",), ("recipes",), ("recipes", "show"), ("compress",), ("eval",), ("export",),
            ("profile",), ("visualize",), ("demo",)]
OPTION = re.compile(r"--[a-z0-9][a-z0-9-]*")
runner = CliRunner()


def _tested(path: Path) -> list[str]:
    text = path.read_text()
    blocks = re.findall(r"<!-- tested -->\s*```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip().startswith("rmeeto ")]


def _all_examples(path: Path) -> list[str]:
    """Every ``rmeeto`` command line in the file's bash blocks (continuations joined)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if "-m compressor " in line:
                line = "rmeeto " + line.split("-m compressor ", 1)[1]
            if line.startswith("rmeeto "):
                lines.append(line)
    return lines


def _help_options(command: tuple[str, ...]) -> set[str]:
    """The options the command's ``--help`` lists in its Options section."""
    res = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    section = res.output.split("Options:", 1)[1] if "Options:" in res.output else ""
    found = set()
    for line in section.splitlines():
        if re.match(r"^\s{1,4}(-\w, )?--", line):
            found |= set(OPTION.findall(line.strip().split("  ")[0]))
    return found - {"--help"}


def _command_of(words: list[str]) -> tuple[str, ...]:
    return tuple(words[:2]) if words[:2] == ["recipes", "show"] else tuple(words[:1])


def _cli_sections() -> dict[tuple[str, ...], str]:
    parts = re.split(r"^### `rmeeto ([^`]*)`\n", CLI_MD.read_text(), flags=re.M)
    sections = {}
    for head, body in zip(parts[1::2], parts[2::2]):
        words = [w for w in head.split() if re.fullmatch(r"[a-z]+", w)]
        sections[_command_of(words)] = head + "\n" + body.split("\n## ")[0]
    return sections


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


def test_cli_md_lists_exactly_each_commands_options():
    sections = _cli_sections()
    assert set(sections) == set(COMMANDS), sorted(set(sections) ^ set(COMMANDS))
    for command, text in sections.items():
        assert ("Options:" in text) != ("No options." in text), command
        documented = set(OPTION.findall(text.split("Options:", 1)[1])) if "Options:" in text else set()
        actual = _help_options(command)
        assert documented == actual, (command, "documented only:", documented - actual, "missing:", actual - documented)


def test_every_command_is_in_the_list():
    from typer.main import get_command

    group = get_command(app)
    names = {(n,) for n in group.commands} | {("recipes", n) for n in group.commands["recipes"].commands}
    assert names == set(COMMANDS)


def test_every_example_names_real_options():
    examples = [(p.name, line) for p in DOCS for line in _all_examples(p)]
    assert len(examples) >= 15
    helps: dict[tuple[str, ...], set[str]] = {}
    for where, line in examples:
        words = shlex.split(line)[1:]
        command = _command_of(words)
        assert command in COMMANDS, f"{where}: `{line}` names no command"
        helps.setdefault(command, _help_options(command))
        used = {w.split("=")[0] for w in words if w.startswith("--")}
        assert used <= helps[command], f"{where}: `{line}` uses {sorted(used - helps[command])}"


def test_documented_commands_run(workdir):
    commands = [c for p in DOCS for c in _tested(p)]
    assert {_command_of(shlex.split(c)[1:]) for c in commands} >= set(COMMANDS) - {("demo",)}  # demo: minutes
    for line in commands:
        result = runner.invoke(app, shlex.split(line)[1:])
        assert result.exit_code == 0, f"`{line}` failed:\n{result.output}"
    assert (workdir / "out" / "r031" / "compressed.pt").is_file()
    assert (workdir / "out" / "smoke" / "log.jsonl").read_text().count("\n") == 1  # one epoch re-trained
    assert (workdir / "out" / "r031.onnx").stat().st_size > 10_000
    for report in ("report", "free"):
        assert (workdir / "out" / report / "report.json").is_file() and (workdir / "out" / report / "throughput.png").is_file()
    assert (workdir / "out" / "merges.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_fits_80_columns_without_cutting_words(command):
    res = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert "…" not in res.output and max(map(len, res.output.splitlines())) <= 80, res.output
