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

    def __init__(self, console: Console, tty: bool | None = None, clock=time.perf_counter):
        self.console = console
        self.tty = console.is_terminal if tty is None else tty
        self._clock = clock
        self._progress = self._task = None
        self._last = ""
        self._t0 = 0.0

    def __enter__(self):
        self._t0 = self._clock()
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

    def update(self, description: str, done: float, total: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=description, completed=done, total=total)
            return
        if description == self._last:
            return
        self._last = description
        elapsed = self._clock() - self._t0
        eta = f"  eta {fmt_duration(elapsed * (total - done) / done)}" if done > 0 else ""  # at the pace so far
        self.console.print(f"[{fmt_duration(elapsed)}] {done:.0f}/{total:g} {description}{eta}", highlight=False,
                           soft_wrap=True, markup=False)
