"""Progress output of the training loop (rank 0 only): rich progress bars on a terminal, plain
log lines otherwise (CI logs, files, ``| tee``), and the Ctrl-C / SIGTERM handler."""

from __future__ import annotations

import signal
import threading
import time

from rich.console import Console

__all__ = ["Reporter", "StopFlag", "fmt_duration", "fmt_rate"]


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_rate(value: float) -> str:
    """A rate with real precision: ``0.0527``, ``7.41``, ``95.3``, ``1234`` (never "0" for 0.05)."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


class Reporter:
    """``start_epoch`` / ``update`` / ``end_epoch`` / ``line`` / ``status``. Silent when not
    ``enabled``.

    Without a terminal (CI logs, files, ``| tee``) a run is never silent for more than
    ``heartbeat_s`` (60 s): the loop reports at least that often at step boundaries
    (:attr:`interval_s`), and a background thread prints what is in progress when a single step
    or an evaluation takes longer than that."""

    def __init__(self, enabled: bool = True, console: Console | None = None, tty: bool | None = None,
                 heartbeat_s: float = 60.0):
        self.enabled = enabled
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.tty = self.console.is_terminal if tty is None else tty
        self.heartbeat_s = heartbeat_s
        self._progress = None
        self._task = None
        self._title = ""
        self._t0 = 0.0
        self._first = 0
        self._total = 0
        self._status = ""
        self._since = time.perf_counter()
        self._last_print = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    @property
    def interval_s(self) -> float:
        """How often the loop should report at step boundaries: every few seconds on a terminal
        (a progress bar), every ``heartbeat_s`` in a log."""
        return 5.0 if self.tty else self.heartbeat_s

    def line(self, text: str) -> None:
        if self.enabled:
            with self._lock:
                self.console.print(text, highlight=False, soft_wrap=True)
                self._last_print = time.perf_counter()

    def status(self, text: str) -> None:
        """What is running now (the heartbeat repeats it while nothing else is printed)."""
        self._status, self._since = text, time.perf_counter()

    # ---- heartbeat (no terminal only)

    def __enter__(self):
        if self.enabled and not self.tty and self.heartbeat_s > 0:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="rmeeto-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return False

    def _beat(self) -> None:
        while not self._stop.wait(min(self.heartbeat_s, 5.0)):
            now = time.perf_counter()
            if self._status and now - self._last_print >= self.heartbeat_s:
                self.line(f"{self._status}: still running ({fmt_duration(now - self._since)} so far)")

    # ---- epochs

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int = 0) -> None:
        if not self.enabled:
            return
        self._title, self._total, self._t0, self._first = f"epoch {epoch + 1}/{epochs}", total, time.perf_counter(), done
        self.status(f"{self._title} step {done + 1}/{total}")
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} img/s"),
                TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self._title, total=total, completed=done, loss="-", lr="-", speed="-")

    def update(self, done: int, loss: float, lr: float, images_per_s: float) -> None:
        if not self.enabled:
            return
        self.status(f"{self._title} step {min(done + 1, self._total)}/{self._total}")
        if self._progress is not None:
            self._progress.update(self._task, completed=done, loss=f"{loss:.4f}", lr=f"{lr:.2e}", speed=fmt_rate(images_per_s))
            return
        rate = (done - self._first) / max(time.perf_counter() - self._t0, 1e-9)
        eta = (self._total - done) / rate if rate > 0 else 0.0
        self.line(
            f"{self._title} step {done}/{self._total}  loss {loss:.4f}  lr {lr:.2e}  "
            f"{fmt_rate(images_per_s)} img/s  eta {fmt_duration(eta)}"
        )

    def end_epoch(self) -> None:
        self._status = ""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM ask the loop to stop at the next step boundary; the loop then
    saves a checkpoint and raises. A second Ctrl-C aborts at once (KeyboardInterrupt, no save).
    Use as a context manager; outside the main thread no handler is installed."""

    def __init__(self, reporter: Reporter | None = None):
        self.requested = False
        self._reporter = reporter
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self._reporter is not None:
            name = signal.Signals(signum).name
            self._reporter.line(f"{name}: stopping after this step and saving a checkpoint (Ctrl-C again aborts without saving)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False
