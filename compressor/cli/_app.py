"""The typer app shared by the command modules, and the error → exit-code bridge."""

from __future__ import annotations

import functools
from typing import Annotated, Optional

import typer
from rich.console import Console

from .._version import __version__
from ..errors import RmeetoError

app = typer.Typer(
    name="rmeeto",
    help="R-MeeTo for Vision Mamba: merge tokens, re-train in minutes, export to ONNX, profile.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: it wraps every help text at any width, where rich's option table
    # squeezed the help column to ~18 characters at 80 columns and cut words with "…"
    rich_markup_mode=None,
)
console = Console()
console_err = Console(stderr=True)


def _version(value: bool):
    if value:
        console.print(f"rmeeto {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
):
    """R-MeeTo for Vision Mamba."""


def user_errors(fn):
    """Wrap a command: RmeetoError → one red line on stderr and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def run(*a, **kw):
        try:
            return fn(*a, **kw)
        except RmeetoError as e:
            console_err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return run


def command(*args, **kwargs):
    """``@command()``: register a typer command whose RmeetoError becomes one red line + exit 1."""

    def wrap(fn):
        return app.command(*args, **kwargs)(user_errors(fn))

    return wrap
