"""Domain errors. The library raises these; only the CLI turns them into a red line and exit 1."""

from __future__ import annotations

__all__ = ["RmeetoError", "CheckpointError", "RecipeError", "BackendUnavailable", "ShapeError", "first_line"]


class RmeetoError(Exception):
    """A user-facing error whose message names the problem and the next step."""


class CheckpointError(RmeetoError):
    """A checkpoint could not be read, is unsafe, or is not a supported Vision Mamba."""


class RecipeError(RmeetoError):
    """A recipe file or value is invalid (the message names the key and the file)."""


class BackendUnavailable(RmeetoError):
    """An explicitly requested kernel backend is not installed or cannot run here."""


class ShapeError(RmeetoError):
    """An input does not have the shape a (static-shape) compressed model was built for."""


def first_line(e: BaseException, *, with_type: bool = False, limit: int | None = None) -> str:
    """The first non-empty line of an exception's message (its type's name when it has none), for
    one-line errors and report notes; ``with_type`` prefixes ``TypeName: ``, ``limit`` caps it."""
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    if with_type or not text:
        text = f"{type(e).__name__}: {text}".rstrip(": ") if text else type(e).__name__
    return text if limit is None else text[:limit]
