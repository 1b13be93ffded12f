"""A progress view for library calls that report ``progress(description, done, total)``:
a rich bar with the elapsed time and an estimate of the rest on a terminal, one plain line per
new step otherwise (CI logs, ``| tee``), so a long run is never silent."""

from __future__ import annotations

import time

from rich.console import Console

from ..engine._progress import fmt_duration

__all__ = ["ProgressView"]


class ProgressView:
    """``with ProgressView(console) as view: work(progress=view.update)``."""

    def __init__(self, console: Console, tty: bool | None = None):
        self.console = console
        self.tty = console.is_terminal if tty is None else tty
        self._progress = self._task = None
        self._last = ""
        self._t0 = time.perf_counter()

    def __enter__(self):
        self._t0 = time.perf_counter()
        if self.tty:
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("starting", total=None)
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False

    def eta(self, done: float, total: float) -> float | None:
        """Seconds left at the average pace so far (None before any progress)."""
        elapsed = time.perf_counter() - self._t0
        return elapsed * (total - done) / done if done > 0 else None

    def update(self, description: str, done: float, total: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=description, completed=done, total=total)
            return
        if description == self._last:
            return
        self._last = description
        eta = self.eta(done, total)
        self.console.print(
            f"[{fmt_duration(time.perf_counter() - self._t0)}] {done:.0f}/{total:g} {description}"
            + (f"  eta {fmt_duration(eta)}" if eta is not None else ""),
            highlight=False, soft_wrap=True,
        )
