"""Progress of a long stage: rows done, total and an ETA, reported from a thread while the stage runs.

By default each report is a log record on the ``genstress_ray.progress`` logger (the CLI shows it as
one line per stage that updates in place on a terminal). API users see the same by configuring
logging, or pass ``progress=`` a callable to ``run_campaign`` to receive ``Progress`` events.

Example:
    >>> import logging
    >>> logging.getLogger("genstress_ray").setLevel(logging.INFO)  # doctest: +SKIP
    >>> run_campaign("jobs/mnist_defuse.yaml", progress=lambda p: print(p.line()))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("genstress_ray.progress")


@dataclass(frozen=True)
class Progress:
    """One progress report of a stage."""

    stage: str
    done: int
    total: int
    elapsed: float
    final: bool = False

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far (None before the first row)."""
        if self.done <= 0 or self.done >= self.total:
            return None if self.done <= 0 else 0.0
        return self.elapsed * (self.total - self.done) / self.done

    def line(self) -> str:
        """``identify: 1,200/35,900 rows (3%), 40 rows/s, ETA 14 min``."""
        share = self.done / self.total if self.total else 1.0
        rate = self.done / self.elapsed if self.elapsed > 0 else 0.0
        tail = f"done in {_duration(self.elapsed)}" if self.final else \
            f"ETA {_duration(self.eta)}" if self.eta is not None else "starting"
        return f"{self.stage}: {self.done:,}/{self.total:,} rows ({share:.0%}), {rate:,.0f} rows/s, {tail}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def log_progress(p: Progress) -> None:
    """The default reporter: a log record marked ``progress`` (see the CLI's handler)."""
    log.info(p.line(), extra={"progress": not p.final})


class StageProgress:
    """Polls ``done()`` every ``interval`` seconds on a thread and reports it, until the block ends.

    Args:
        stage: the stage's name.
        total: rows the stage will process.
        done: returns rows processed so far (e.g. from a Ray counter actor).
        report: receives each ``Progress`` (default: ``log_progress``).
    """

    def __init__(self, stage: str, total: int, done: Callable[[], int], report: Callable[[Progress], None] | None = None,
                 interval: float = 2.0):
        self.stage, self.total, self.done = stage, total, done
        self.report = report or log_progress
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"progress-{stage}", daemon=True)

    def _emit(self, final: bool = False) -> None:
        try:
            done = self.total if final else min(self.done(), self.total)
        except Exception:  # progress is best effort; the stage itself reports real failures
            return
        self.report(Progress(self.stage, done, self.total, time.time() - self.started, final))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._emit()

    def __enter__(self) -> "StageProgress":
        self.started = time.time()
        self._thread.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)
        if exc_type is None:
            self._emit(final=True)
