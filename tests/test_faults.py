"""A failure inside a Ray task is named by its root cause, and the resume command is offered only when
running it again can succeed. Every fault here is real: a full or read-only file system (a tmpfs mounted
for the test), an S3 endpoint nobody listens on, a bad value raised inside a Ray Data worker."""

import contextlib
import re
import socket
import subprocess
import sys

import pytest
import yaml

from genstress_ray.storage import StageError, filesystem_for, write_bytes_atomic


@contextlib.contextmanager
def _tmpfs(path, size: str, *options: str):
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", *options))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fail_in_ray_data(write):
    """Run ``write`` inside a Ray Data worker, as the search stages do, and return the driver's error."""
    import ray.data

    def udf(batch):
        write()
        return batch

    with pytest.raises(Exception) as caught:
        ray.data.range(2, override_num_blocks=1).map_batches(udf).materialize()
    return StageError("identify", "the-run", caught.value)


def test_an_unreachable_s3_endpoint_is_named_and_resumable(ray_cluster):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the write: nothing listens there
    endpoint = f"http://127.0.0.1:{port}"
    fs, path = filesystem_for("s3://bucket/run", {"endpoint_url": endpoint,
                                                  "config_kwargs": {"retries": {"max_attempts": 1}}})
    error = _fail_in_ray_data(lambda: write_bytes_atomic(fs, f"{path}/shard.parquet", b"x"))
    assert "UDF failed" not in str(error)
    assert f"127.0.0.1:{port}" in str(error) and "endpoint could not be reached" in str(error)
    assert error.fault.resumable


def test_a_read_only_folder_is_named_and_resumable(ray_cluster, tmp_path):
    with _tmpfs(tmp_path / "ro", "1m", "ro") as folder:
        fs, path = filesystem_for(str(folder))
        error = _fail_in_ray_data(lambda: write_bytes_atomic(fs, f"{path}/shard.parquet", b"x"))
    assert "Read-only file system" in str(error) and "read-only file system: make it writable" in str(error)
    assert error.fault.resumable


def test_a_bad_value_inside_a_worker_is_named_and_not_offered_as_resumable(ray_cluster):
    def bad():
        raise ValueError("strategy.defuse.a: must be finite, got inf")

    error = _fail_in_ray_data(bad)
    assert "ValueError: strategy.defuse.a: must be finite, got inf" in str(error)
    assert not error.fault.resumable and "fails the same way" in str(error)


def test_a_full_disk_stops_the_run_with_the_cause_and_the_printed_command_resumes_it(tiny_config, tmp_path):
    """The command the error prints is run as printed, once there is room, and finishes the run."""
    with _tmpfs(tmp_path / "small", "32k") as disk:
        cfg = {**tiny_config, "output": str(disk / "runs")}
        cfg["data"]["search"]["limit"] = 400  # an identify shard of about 44 KB: more than the disk holds
        cfg["strategy"] = {**cfg["strategy"], "draws": 64}
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cli = [sys.executable, "-m", "genstress_ray.cli"]
        full = subprocess.run([*cli, "run", str(path)], capture_output=True, text=True, timeout=600)
        assert full.returncode == 1, full.stderr[-2000:]
        assert "No space left on device" in full.stderr and "the disk holding the run is full" in full.stderr
        assert "UDF failed" not in full.stderr and "Traceback" not in full.stderr
        command = re.search(r"to resume, run: genstress (.+)$", full.stderr, re.M).group(1).split()
        subprocess.run(["mount", "-o", "remount,size=1m", str(disk)], check=True)
        resumed = subprocess.run([*cli, *command], capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert (disk / "runs" / "test" / "r1" / "region_samples" / "_COMPLETE").exists()
