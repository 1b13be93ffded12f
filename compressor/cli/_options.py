"""Options shared by several commands."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

ModelFactory = Annotated[
    Optional[str],
    typer.Option(
        "--model-factory", metavar="PKG.MODULE:CALLABLE",
        help="Build your own Vision Mamba class (one rmeeto did not write) with this importable function and load "
             "the checkpoint's weights into it; name it again to load what was compressed from it.",
    ),
]
ModelKwargs = Annotated[
    Optional[str],
    typer.Option("--model-kwargs", metavar="JSON", help="Keyword arguments for --model-factory, e.g. '{\"depth\": 12}'."),
]
