"""A non-editable install works: build the wheel, install it into a fresh virtual environment and
run ``rmeeto recipes`` and a training-free ``rmeeto compress`` there, outside the repository.

The fresh environment reuses this interpreter's installed dependencies (torch, timm, ...) through
a ``.pth`` file that lists their site-packages folders: downloading torch again would take
minutes and a network. A path listed in a ``.pth`` is added to ``sys.path`` but its own ``.pth``
files are not run, so the editable install of rmeeto that may live there (a ``.pth`` import
hook pointing at this checkout) stays inactive: ``compressor`` can only come from the wheel,
which the test checks.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from compressor import __version__
from compressor.models import create_model
from compressor.recipes import list_recipe_names

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout, built from a copy (no build/ or egg-info left in the repo)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "compressor", src / "compressor", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)], cwd=src)
    (path,) = dist.glob("rmeeto-*.whl")
    return path


def test_wheel_ships_the_builtin_recipes(wheel):
    assert wheel.name.startswith(f"rmeeto-{__version__}-")  # pyproject reads compressor/_version.py
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(Path(n).stem for n in names if n.startswith("compressor/builtin_recipes/") and n.endswith(".toml"))
    assert shipped == list_recipe_names() and "r031" in shipped


def test_installed_wheel_lists_recipes_and_compresses(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).stdout.strip())
    deps = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
    (purelib / "_rmeeto_test_deps.pth").write_text("\n".join(deps) + "\n")
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)], cwd=tmp_path)

    rmeeto = str(venv / "bin" / "rmeeto")
    listing = _run([rmeeto, "recipes"], cwd=tmp_path).stdout
    assert all(name in listing for name in ("r014", "r031", "r056", "prune-r031", "paper-vim-s"))

    torch.manual_seed(0)
    torch.save({"model": create_model("vim_test").state_dict()}, tmp_path / "tiny.pth")
    out = _run([rmeeto, "compress", "tiny.pth", "--recipe", "r031", "-o", "out"], cwd=tmp_path).stdout
    assert "wrote" in out and (tmp_path / "out" / "compressed.pt").is_file()
    check = ("import compressor; m = compressor.load_model('out/compressed.pt'); "
             "print(compressor.__file__, m.recipe.name, len(m.steps))")
    where, recipe, merges = _run([str(py), "-c", check], cwd=tmp_path).stdout.split()
    assert Path(where).is_relative_to(venv), where  # the wheel's copy ran, not this checkout
    assert (recipe, merges) == ("r031", "1")
