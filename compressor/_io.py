"""Small I/O helpers: atomic writes (temp file in the same folder, fsync, rename) and output
folders checked before, and created after, the other input checks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .errors import RmeetoError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file,
    and an interrupted write leaves the previous file intact."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise RmeetoError(f"cannot write {path}: {e.strerror}; choose a writable output location") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it normal permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda p: torch.save(obj, p))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def check_out_dir(path: str | os.PathLike, option: str = "-o/--out") -> Path:
    """Check that ``path`` could be created (or is) a writable folder, creating nothing: run it
    before the other input checks, and :func:`make_out_dir` after them, so a failed check leaves
    no empty folder behind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RmeetoError(f"cannot write to output directory {path} (it is a file): choose a folder with {option}")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RmeetoError(f"cannot write to output directory {path} ({parent} is a file): choose a writable {option}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RmeetoError(f"cannot write to output directory {path} ({parent} is not writable): choose a writable {option}")
    return path


def make_out_dir(path: str | os.PathLike, option: str = "-o/--out") -> Path:
    """Create ``path`` (with parents) and probe that a file can be written in it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise RmeetoError(f"cannot write to output directory {path} ({e.strerror or type(e).__name__}): choose a writable {option}") from None
    return path
