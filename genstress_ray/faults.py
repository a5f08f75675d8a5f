"""What went wrong inside a Ray task, in one line, and whether running the same command again can succeed.

Ray hands the driver its own wrappers (``RayTaskError(UserCodeException)``: "UDF failed to process a data
block") and keeps the worker's real error only as traceback text, so the root cause is read from there.
"""

from __future__ import annotations

import builtins
import errno
import re
from dataclasses import dataclass

_CHAINED = re.compile(r"\n\s*(?:The above exception was the direct cause of the following exception:|"
                      r"During handling of the above exception, another exception occurred:)\s*\n")
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*): ?(.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERRNO = re.compile(r"\[Errno (\d+)\]")
_RAY_WRAPPERS = {"UserCodeException", "RayTaskError", "RayError"}

# Faults of the machine, the network or the cluster: the same command succeeds once they are gone.
_ENVIRONMENT = {
    "MemoryError", "OutOfMemoryError",
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError",
    "ServerDisconnectedError", "NoCredentialsError", "ClientError",
    # Ray's own: a worker, node or object lost, memory or disk exhausted.
    "ActorDiedError", "RayActorError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
    "LocalRayletDiedError", "ObjectLostError", "OwnerDiedError", "ObjectReconstructionFailedError",
    "ObjectFetchTimedOutError", "ObjectStoreFullError", "OutOfDiskError", "RaySystemError", "GetTimeoutError",
    "TaskCancelledError",
}
_ERRNO_ADVICE = {
    errno.ENOSPC: "the disk holding the run is full: free space there, then resume",
    errno.EDQUOT: "the disk quota for the run's folder is used up: free space there, then resume",
    errno.EROFS: "the run's folder is on a read-only file system: make it writable, then resume",
    errno.EACCES: "permission denied: give this user write access to the run's folder, then resume",
    errno.EPERM: "operation not permitted on the run's folder: fix its permissions, then resume",
}

_NAMED_ADVICE = {
    "NoCredentialsError": "no object-store credentials on the Ray workers: set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY or a profile, then resume",
    "OutOfMemoryError": "out of memory: give the stage more memory or smaller batches, then resume",
    "MemoryError": "out of memory: give the stage more memory or smaller batches, then resume",
}


@dataclass(frozen=True)
class Fault:
    """The root cause of a failure: ``name`` its exception type, ``message`` its first line, ``advice``
    what to do, ``resumable`` whether the same command can succeed once the cause is gone (a full disk,
    an unreachable endpoint, a lost node) rather than fail the same way (a bad value, a bug)."""

    name: str
    message: str
    advice: str
    resumable: bool

    def __str__(self) -> str:
        text = f"{self.name}: {self.message}" if self.message else self.name
        return text[:400] + (f" ({self.advice})" if self.advice else "")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first (Python's ``__cause__`` and Ray's ``cause``)."""
    chain = [exc]
    while True:
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException) or inner in chain:
            return chain
        exc = inner
        chain.append(exc)


def _from_traceback(text: str) -> list[tuple[str, str]]:
    """Each exception of a chained traceback printed by a Ray worker, root first: its type and message."""
    found = []
    for part in _CHAINED.split(_ANSI.sub("", text)):
        for line in reversed([line for line in part.splitlines() if line.strip()]):
            # Not a frame, a source line or Ray's "ray::Actor.method()" header.
            match = None if line[0].isspace() or line.startswith("ray::") else _ERROR_LINE.match(line)
            if match:
                found.append((match.group(1).rsplit(".", 1)[-1], match.group(2).strip()))
                break
    return found


def _described(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, OSError) and exc.strerror:  # Ray's wrapper keeps errno and path, not the message
        code = f"[Errno {exc.errno}] " if exc.errno else ""
        message = code + exc.strerror + (f": {exc.filename}" if exc.filename else "")
    else:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        message = lines[0] if lines else ""
    return type(exc).__name__.removeprefix("RayTaskError(").rstrip(")"), message


def _builtin_os_error(name: str) -> bool:
    """A built-in ``OSError`` kind (NotADirectoryError, IsADirectoryError, BlockingIOError, ...)."""
    kind = getattr(builtins, name, None)
    return isinstance(kind, type) and issubclass(kind, OSError)


def _classify(name: str, message: str) -> Fault:
    code = _ERRNO.search(message)
    advice = _ERRNO_ADVICE.get(int(code.group(1))) if code else None
    if advice is None and "No space left on device" in message:
        advice = _ERRNO_ADVICE[errno.ENOSPC]
    if advice is None and "Read-only file system" in message:
        advice = _ERRNO_ADVICE[errno.EROFS]
    advice = advice or _NAMED_ADVICE.get(name)
    if advice:
        return Fault(name, message, advice, True)
    if name in _ENVIRONMENT or name.endswith("ConnectionError") or _builtin_os_error(name):
        unreachable = any(word in (name + message).lower() for word in ("connect", "timeout", "timed out"))
        advice = ("the endpoint could not be reached: check it and the network, then resume" if unreachable
                  else "a fault of the machine, storage or cluster: once it is fixed, resume")
        return Fault(name, message, advice, True)
    return Fault(name, message, "not a transient fault: the same command fails the same way until the input "
                 "or the code is changed; -v shows the full traceback", False)


def root_cause(exc: BaseException) -> Fault:
    """The cause of ``exc``, through Python's chain, Ray's ``cause`` and a Ray worker's traceback text:
    the last error raised that is not Ray's wrapper, resumable when any error of the chain is a fault of
    the machine, storage or network.

    >>> root_cause(RuntimeError("wrapped")).resumable
    False
    >>> root_cause(OSError(28, "No space left on device")).advice
    'the disk holding the run is full: free space there, then resume'
    """
    chain = _chain(exc)
    # Ray's task error holds the worker's whole chained traceback, as text only.
    ray_error = next((e for e in chain if type(e).__name__.startswith("RayTaskError")), None)
    errors = (ray_error and _from_traceback(str(ray_error))) or [_described(e) for e in reversed(chain)]
    errors = [e for e in errors if e[0] not in _RAY_WRAPPERS] or [_described(chain[-1])]
    shown = _classify(*errors[-1])
    if shown.resumable:
        return shown
    for name, message in reversed(errors[:-1]):
        cause = _classify(name, message)
        if cause.resumable:
            return Fault(shown.name, f"{shown.message} (caused by {name}: {message})", cause.advice, True)
    return shown


def short_cause(exc: BaseException) -> str:
    """One line for an exception: its root cause and what to do about it."""
    return str(root_cause(exc))
