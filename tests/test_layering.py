"""The package's floors: a module imports only from floors below its own (docs/design.md,
"Layering"). Every ``import``/``from ... import`` in the source counts, inside functions too."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "compressor"

FLOORS = {
    "errors": 0, "_version": 0,
    "_io": 1, "_device": 1,
    "ops": 2, "inference": 2,
    "models": 3, "merge": 3,
    "recipes": 4, "fx": 4, "flops": 4,
    "convert": 5,
    "loading": 6, "export": 6,
    "engine": 7,
    "profile": 8, "visualize": 8, "compress": 8,
    "search": 9,
    "demo": 10,
    "cli": 11,
}
FACADES = {"__init__", "__main__"}  # the package's public names and ``python -m compressor``


def _unit(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return parts[0]


def _imported_units(path: Path) -> set[str]:
    """The top-level units of ``compressor`` that ``path`` imports (absolute or relative)."""
    here = list(path.relative_to(ROOT).with_suffix("").parts)[:-1]  # the module's package inside compressor
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("compressor.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module or "").startswith("compressor"):
                    continue
                parts = node.module.split(".")[1:]
            else:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                parts = base + (node.module.split(".") if node.module else [])
            if parts:
                out.add(parts[0])
            else:  # ``from . import x`` at the package root
                out |= {a.name for a in node.names}
    return out


def _modules():
    return sorted(p for p in ROOT.rglob("*.py") if _unit(p) not in FACADES)


def test_every_unit_has_a_floor():
    units = {_unit(p) for p in ROOT.rglob("*.py")} - FACADES
    assert units <= set(FLOORS), f"give these a floor in FLOORS and docs/design.md: {sorted(units - set(FLOORS))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_go_down(path):
    unit = _unit(path)
    up = sorted(u for u in _imported_units(path) - {unit} if u in FLOORS and FLOORS[u] >= FLOORS[unit])
    assert not up, f"{path.relative_to(ROOT)} (floor {FLOORS[unit]}) imports {up} (floors {[FLOORS[u] for u in up]})"


def test_the_checker_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    """The import reader itself: a relative import two levels up inside a function is found."""
    pkg = tmp_path / "compressor" / "models"
    pkg.mkdir(parents=True)
    mod = pkg / "m.py"
    mod.write_text("def f():\n    from ..convert import convert\n    from . import vim\n    import compressor.merge.fast\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "compressor")
    assert _imported_units(mod) == {"convert", "models", "merge"}
