"""One writer per run: a lease file in the run folder, taken atomically, renewed by a heartbeat.

Two drivers on the same run id would both write every stage (duplicate rows, regions fitted on
them). The first to create ``<run>/_LEASE`` owns the run; the file names its holder and when the
lease expires. A heartbeat renews it every ``ttl / 3`` seconds; a crashed driver's lease expires and
the next driver takes it over (at once when the holder was a process on this host that is gone). Every write of the file is conditional, so two drivers cannot both
win: on object storage through S3's conditional writes (``If-None-Match: *`` to create, ``If-Match:
<etag>`` to replace), on a local or mounted folder through ``O_EXCL`` and an ``flock``ed swap.
The owner checks the lease before committing each stage, and stops when it has lost it.

Example:
    >>> lease = RunLease.for_store(store)  # doctest: +SKIP
    >>> with lease:  # doctest: +SKIP
    ...     lease.check()  # before each stage's completion marker
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import fsspec

from genstress_ray.storage import StorageError

log = logging.getLogger(__name__)
LEASE = "_LEASE"
DEFAULT_TTL = 120.0


class LeaseHeld(StorageError):
    """Another driver owns the run (or took it over): the message names it and when its lease expires."""


def _when(timestamp: float) -> str:
    try:
        return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError, TypeError):
        return repr(timestamp)


def describe(record: dict[str, Any]) -> str:
    """``holder (expires at ...)`` for messages and listings."""
    return f"{record.get('holder', '?')} (lease expires {_when(record.get('expires_at', 0))})"


def lease_record(data: bytes, written_at: float, ttl: float = DEFAULT_TTL) -> dict[str, Any]:
    """A lease file's record, made safe to act on. The file sits in the run folder, writable by anyone
    who can write there, so nothing in it can lock a run for longer than ``ttl`` after it was last
    written (``written_at``, the file's modification time): a later ``expires_at`` is cut to that, and
    an empty, unreadable or malformed file is a lease held by nobody known that expires then.

    >>> lease_record(b"", 100.0, 120.0)["expires_at"]
    220.0
    >>> lease_record(b'{"holder": "h:1:a", "expires_at": 1e300}', 100.0, 120.0)["expires_at"]
    220.0
    """
    try:
        record = json.loads(data)
        holder, expires = record["holder"], float(record["expires_at"])
        if not isinstance(holder, str) or not math.isfinite(expires):
            raise ValueError(holder)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return {"holder": f"an unreadable lease file ({len(data)} bytes; it counts as expired {ttl:g} s after it "
                          "was written)", "expires_at": written_at + ttl, "malformed": True}
    return {**record, "holder": holder, "expires_at": min(expires, written_at + ttl)}


class _LocalSwap:
    """Conditional writes on a POSIX folder: create with O_EXCL, compare-and-swap under flock."""

    def __init__(self, fs, path: str):
        self.path = path
        self.lock_path = f"{path}.lock"

    def read(self) -> tuple[bytes | None, str | None, float]:
        """The file's bytes, its tag and its modification time (None, None, 0 when there is none)."""
        try:
            with open(self.path, "rb") as f:
                return (data := f.read()), hashlib.sha256(data).hexdigest(), os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None, None, 0.0

    def create(self, data: bytes) -> str | None:
        # Written whole under another name, then linked into place (fails when the lease exists): a
        # contender never reads a lease between its creation and its write.
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return None
        finally:
            os.remove(tmp)
        return hashlib.sha256(data).hexdigest()

    def replace(self, tag: str, data: bytes) -> str | None:
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.read()[1] != tag:
                return None
            tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
            return hashlib.sha256(data).hexdigest()

    def delete(self, tag: str) -> None:
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.read()[1] == tag:
                os.remove(self.path)


class _ObjectSwap:
    """Conditional writes on S3 (and S3-compatible stores that honour If-None-Match / If-Match)."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def read(self) -> tuple[bytes | None, str | None, float]:
        self.fs.invalidate_cache(self.path)
        try:
            data = self.fs.cat_file(self.path)
            info = self.fs.info(self.path)
        except FileNotFoundError:
            return None, None, 0.0
        return data, info["ETag"], _timestamp(info.get("LastModified"))

    def _put(self, data: bytes, **condition) -> str | None:
        try:
            out = self.fs.pipe_file(self.path, data, **condition)
        except (FileExistsError, OSError) as exc:
            if isinstance(exc, FileExistsError) or "pre-condition" in str(exc) or "412" in str(exc):
                return None
            raise
        return (out or {}).get("ETag") or self.read()[1]

    def create(self, data: bytes) -> str | None:
        return self._put(data, mode="create")

    def replace(self, tag: str, data: bytes) -> str | None:
        return self._put(data, IfMatch=tag)

    def delete(self, tag: str) -> None:
        if self.read()[1] == tag:  # S3 has no conditional delete here; an expired lease is replaced, not deleted
            self.fs.rm_file(self.path)


def _timestamp(when) -> float:
    return when.timestamp() if isinstance(when, datetime) else time.time()


def _swap_for(fs: fsspec.AbstractFileSystem, path: str):
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return _LocalSwap(fs, path)
    if "s3" in protocols or "s3a" in protocols:
        return _ObjectSwap(fs, path)
    raise StorageError(f"{path}: runs need conditional writes for their lease; supported on local folders and S3, "
                       f"not on {protocols[0]}://")


def holder_gone(record: dict[str, Any]) -> bool:
    """Whether the holder ran on this host in a process that no longer exists (a driver killed with
    SIGKILL): its lease need not be waited out. A holder on another host is judged by expiry alone."""
    host, _, rest = str(record.get("holder", "")).partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class RunLease:
    """The lease on one run folder; use as a context manager around the run's work."""

    def __init__(self, fs: fsspec.AbstractFileSystem, run_path: str, run_uri: str, ttl: float = DEFAULT_TTL):
        self.uri = f"{run_uri}/{LEASE}"
        self.swap = _swap_for(fs, f"{run_path}/{LEASE}")
        self.ttl = ttl
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.tag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_store(cls, store, ttl: float = DEFAULT_TTL) -> "RunLease":
        return cls(store.fs, store.path, store.uri, ttl)

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({"holder": self.holder, "acquired_at": now, "expires_at": now + self.ttl,
                           "ttl": self.ttl}).encode()

    def _current(self) -> tuple[dict | None, str | None]:
        """The lease as it stands (``lease_record``) and its tag; (None, None) when there is none."""
        data, tag, written_at = self.swap.read()
        return (None, None) if data is None else (lease_record(data, written_at, self.ttl), tag)

    def acquire(self) -> "RunLease":
        """Take the lease, or take over an expired one; ``LeaseHeld`` names a live holder."""
        tag = self.swap.create(self._record())
        if tag is None:
            current, current_tag = self._current()
            if current is not None and current["expires_at"] > time.time() and not holder_gone(current):
                raise LeaseHeld(f"run {self.uri.rsplit('/', 1)[0]} is being written by {describe(current)}; "
                                "wait for it to finish, or rerun after the lease expires if that driver is gone")
            tag = self.swap.replace(current_tag, self._record()) if current is not None else \
                self.swap.create(self._record())
            if tag is None:  # another driver took it over first
                current, _ = self._current()
                raise LeaseHeld(f"run {self.uri.rsplit('/', 1)[0]} was just taken over by "
                                f"{describe(current or {})}")
            log.info("took over the lease of %s, %s", describe(current or {}),
                     "whose process is gone" if current and holder_gone(current) else "expired")
        self.tag = tag
        self._thread = threading.Thread(target=self._heartbeat, name="genstress-lease", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except Exception as exc:  # a storage hiccup: the next beat retries; check() reports a real loss
                log.warning("lease heartbeat on %s failed: %s", self.uri, exc)

    def renew(self) -> None:
        """Extend the lease; marks it lost when another driver holds it now. A StorageError when the
        lease file cannot be reached."""
        with self._lock:
            if self.lost or self.tag is None:
                return
            try:
                tag = self.swap.replace(self.tag, self._record())
            except (OSError, ValueError) as exc:
                raise StorageError(f"cannot renew the lease {self.uri}: {exc}") from exc
            if tag is None:
                current, _ = self._current()
                self.lost = describe(current) if current else "nobody (the lease file is gone)"
            else:
                self.tag = tag

    def check(self) -> None:
        """Raise ``LeaseHeld`` unless this driver still owns the run; call before committing a stage."""
        self.renew()
        if self.lost:
            raise LeaseHeld(f"lost the lease on {self.uri.rsplit('/', 1)[0]} to {self.lost}; "
                            "this driver stops without committing")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self.tag is not None and not self.lost:
                try:
                    self.swap.delete(self.tag)
                except Exception as exc:  # it expires by itself
                    log.warning("could not release the lease %s: %s", self.uri, exc)
            self.tag = None

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def holding(store, wait: float = 0.0):
    """Hold the run's lease for a short write, waiting up to ``wait`` seconds for another short writer
    (a second review page) to finish; ``LeaseHeld`` after that (a campaign writing the run)."""
    deadline = time.time() + wait
    while True:
        lease = RunLease.for_store(store)
        try:
            lease.acquire()
            break
        except LeaseHeld:
            if time.time() >= deadline:
                raise
            time.sleep(0.1)
    try:
        yield lease
    finally:
        lease.release()


def read_lease(fs: fsspec.AbstractFileSystem, run_path: str) -> dict[str, Any] | None:
    """The lease record of a run folder, or None when nobody holds it (or it expired)."""
    data, _, written_at = _swap_for(fs, f"{run_path}/{LEASE}").read()
    if data is None:
        return None
    record = lease_record(data, written_at)
    return record if record["expires_at"] > time.time() else None
