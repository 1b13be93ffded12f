"""The ``rmeeto`` command line. One module per command; each command calls one library function.

Library code raises :class:`~compressor.errors.RmeetoError`; :func:`main` turns it into one red
line and exit code 1 (no traceback for user mistakes).
"""

from __future__ import annotations

import sys

import typer

from ._app import app, console_err
from ..errors import RmeetoError

# importing a command module registers its command on ``app``
from . import info  # noqa: E402,F401
from . import recipes  # noqa: E402,F401
from . import profile as _profile  # noqa: E402,F401
from . import visualize  # noqa: F401
from . import compress  # noqa: F401
from . import export  # noqa: F401
from . import eval as _eval  # noqa: F401
from . import demo as _demo  # noqa: F401
from . import models as _models  # noqa: F401

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except RmeetoError as e:  # raised outside typer's own handling
        console_err.print(f"[red]error:[/red] {e}")
        sys.exit(1)
