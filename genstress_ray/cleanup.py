"""Ending the local Ray cluster a command started, even when the command is killed.

Every normal exit path calls ``ray.shutdown()``. A driver killed with SIGKILL cannot: its raylet and
GCS die with it, but Ray's dashboard and runtime-env agents live on (about 180 MB), and so, now and
then, does a worker. So after starting a local cluster the driver starts a small watchdog process.
While the driver lives, the watchdog keeps a record of every process below it (with start times, so a
reused PID is never touched): workers are the raylet's children, and once the raylet is gone they are
orphans, and they rename themselves to ``ray::IDLE``, so neither their parent nor their command line
finds them afterwards. When the driver is gone, the watchdog ends whichever recorded processes are
still alive (and any worker still starting, found by its node id), then exits. It only ever signals
processes this run started.

Linux only (it reads /proc); elsewhere nothing is watched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, ProcessLookupError, IndexError, PermissionError):
        return None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except (FileNotFoundError, PermissionError):
        return []


def descendants(pid: int) -> list[tuple[int, str]]:
    """Every process below ``pid``, as (pid, start time)."""
    found, queue = [], _children(pid)
    while queue:
        child = queue.pop()
        start = _start_time(child)
        if start is not None:
            found.append((child, start))
            queue += _children(child)
    return found


def _node_workers(node_id: str) -> list[tuple[int, str]]:
    """Ray worker processes of one node: its raylet starts each with ``--node-id=<id>``."""
    mark = f"--node-id={node_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if mark in f.read():
                        start = _start_time(int(entry))
                        if start is not None:
                            found.append((int(entry), start))
            except OSError:
                pass
    return found


def watch_started_processes(node_id: str) -> None:
    """Start the watchdog for the processes this driver starts (call after ray.init); a worker still
    starting when the driver dies is found by ``node_id``."""
    if not os.path.isdir("/proc"):
        return
    me = os.getpid()
    started = descendants(me)
    if not started:  # joined a running cluster: nothing of ours to end
        return
    # Run as a file, not ``-m``: the package's imports (torch) take seconds on a loaded machine, and a
    # driver killed in those seconds must not escape the record; what runs now is passed along too.
    subprocess.Popen([sys.executable, "-I", __file__, str(me), _start_time(me) or "", node_id, json.dumps(started)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def _alive(pid: int, start: str) -> bool:
    return _start_time(pid) == start


def _watch(driver: int, driver_start: str, node_id: str, started: set[tuple[int, str]], poll: float = 0.25) -> None:
    me = os.getpid()
    while _alive(driver, driver_start):
        started.update((pid, start) for pid, start in descendants(driver) if pid != me)
        if started and not any(_alive(pid, start) for pid, start in started):
            return  # ray.shutdown() ended them
        time.sleep(poll)
    started.update(_node_workers(node_id))
    left = [(pid, start) for pid, start in started if _alive(pid, start)]
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 5
    while time.time() < deadline and any(_alive(p, s) for p, s in left):
        time.sleep(0.2)
    for pid, start in left:
        if _alive(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    _watch(int(sys.argv[1]), sys.argv[2], sys.argv[3], {tuple(p) for p in json.loads(sys.argv[4])})
