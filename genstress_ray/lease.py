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

import fcntl
import hashlib
import json
import logging
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
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(record: dict[str, Any]) -> str:
    """``holder (expires at ...)`` for messages and listings."""
    return f"{record.get('holder', '?')} (lease expires {_when(record.get('expires_at', 0))})"


class _LocalSwap:
    """Conditional writes on a POSIX folder: create with O_EXCL, compare-and-swap under flock."""

    def __init__(self, fs, path: str):
        self.path = path
        self.lock_path = f"{path}.lock"

    def read(self) -> tuple[dict | None, str | None]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return json.loads(data), hashlib.sha256(data).hexdigest()

    def create(self, data: bytes) -> str | None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return hashlib.sha256(data).hexdigest()

    def replace(self, tag: str, data: bytes) -> str | None:
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _, current = self.read()
            if current != tag:
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

    def read(self) -> tuple[dict | None, str | None]:
        self.fs.invalidate_cache(self.path)
        try:
            data = self.fs.cat_file(self.path)
            etag = self.fs.info(self.path)["ETag"]
        except FileNotFoundError:
            return None, None
        return json.loads(data), etag

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

    def acquire(self) -> "RunLease":
        """Take the lease, or take over an expired one; ``LeaseHeld`` names a live holder."""
        tag = self.swap.create(self._record())
        if tag is None:
            current, current_tag = self.swap.read()
            if current is not None and current.get("expires_at", 0) > time.time() and not holder_gone(current):
                raise LeaseHeld(f"run {self.uri.rsplit('/', 1)[0]} is being written by {describe(current)}; "
                                "wait for it to finish, or rerun after the lease expires if that driver is gone")
            tag = self.swap.replace(current_tag, self._record()) if current is not None else \
                self.swap.create(self._record())
            if tag is None:  # another driver took it over first
                current, _ = self.swap.read()
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
                current, _ = self.swap.read()
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


def read_lease(fs: fsspec.AbstractFileSystem, run_path: str) -> dict[str, Any] | None:
    """The lease record of a run folder, or None when nobody holds it (or it expired)."""
    path = f"{run_path}/{LEASE}"
    fs.invalidate_cache(run_path)
    try:
        record = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None
    return record if record.get("expires_at", 0) > time.time() else None
