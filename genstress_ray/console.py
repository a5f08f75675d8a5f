"""What the ``genstress`` command prints: the library's log lines, one progress line per stage, and
(only with ``-v``) what Ray prints."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings


class _ProgressHandler(logging.StreamHandler):
    """Progress records (``extra={"progress": True}``) update one line in place on a terminal and
    appear at most every 30 s elsewhere (a log file, CI); every other record is a line of its own."""

    def __init__(self):
        super().__init__()
        self.open_line = False
        self.last = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # the current one (tests and callers may swap it)
        self.tty = self.stream.isatty()
        progress = getattr(record, "progress", False)
        if progress and not self.tty:
            if time.time() - self.last < 30:
                return
            self.last = time.time()
        msg = self.format(record)
        if progress and self.tty:
            self.stream.write(f"\r{msg}\x1b[K")
            self.open_line = True
        else:
            self.stream.write(("\r" if self.open_line and self.tty else "") + msg + "\x1b[K" * self.tty + "\n")
            self.open_line = False
        self.flush()


class HideRayNotices:
    """Standard output without Ray's raylet notice that many worker processes were started (on 2
    cores a correction sweep starts ~18 for its trials: expected, not an error). Ray prints it from a
    thread straight to sys.stdout; it stays in Ray's log files. Everything else passes through."""

    NOTICE = "worker processes have been started"

    def __init__(self, stream):
        self.stream = stream
        self.dropped = False

    def write(self, text: str) -> int:
        if "(raylet" in text and self.NOTICE in text:
            self.dropped = True  # print() writes the line, then its newline
            return len(text)
        if self.dropped and text == "\n":
            self.dropped = False
            return len(text)
        self.dropped = False
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def configure_output(verbose: bool) -> None:
    """By default: the library's own log lines and one progress line per stage; Ray's progress bars,
    worker logs and info lines only with --verbose."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s",
                        stream=sys.stderr)
    handler = _ProgressHandler()
    handler.setFormatter(logging.Formatter("genstress: %(message)s"))
    library = logging.getLogger("genstress_ray")
    for old in [h for h in library.handlers if isinstance(h, _ProgressHandler)]:
        library.removeHandler(old)
    library.setLevel(logging.INFO)
    library.addHandler(handler)
    library.propagate = False
    os.environ["GENSTRESS_VERBOSE"] = "1" if verbose else "0"
    if not verbose:
        warnings.filterwarnings("ignore", category=UserWarning)
        for name in ("ray", "ray.data", "ray.train", "ray.tune"):  # before Ray's first (auth) warning
            logging.getLogger(name).setLevel(logging.ERROR)
        sys.unraisablehook = _quiet_ray_destructors(sys.unraisablehook)


def _quiet_ray_destructors(default):
    """An unraisable-exception hook that drops errors raised in Ray's own destructors and passes every
    other one on. A Ctrl-C can leave a Ray Data dataset half built, and its ``__del__`` then prints an
    "Exception ignored ... Traceback" after the one-line interrupt message."""
    def hook(unraisable) -> None:
        if getattr(unraisable.object, "__module__", "").startswith("ray."):
            logging.getLogger(__name__).debug("ignored in %r: %s", unraisable.object, unraisable.exc_value)
            return
        default(unraisable)
    hook.quiet_ray = True
    return default if getattr(default, "quiet_ray", False) else hook
