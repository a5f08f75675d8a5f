"""Campaigns as Ray jobs, against a real ``ray start --head`` on loopback (its own ports, temp dir and auth
token, stopped by its PID): submit, follow to success, find the run, a duplicate refused, list, stop."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from genstress_ray.config import ConfigError
from genstress_ray.jobs import plan, submission_id

RAY = str(Path(sys.executable).parent / "ray")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster started as a user would (``ray start --head --block``), with token auth."""
    gcs, dashboard, agent, agent_grpc, metrics, runtime_env, node, objects = _free_ports(8)
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
         "--node-manager-port", str(node), "--object-manager-port", str(objects), "--num-cpus", "2",
         "--temp-dir", temp, "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_jobs_api(address, env, proc)
        yield address, env
    finally:
        proc.send_signal(signal.SIGTERM)  # --block ends what it started on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
            proc.wait()


def _wait_for_jobs_api(address: str, env: dict, proc) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}: {proc.stdout.read().decode()[-3000:]}")
        if _genstress("jobs", "--address", address, env=env).returncode == 0:
            return
        time.sleep(2)
    raise RuntimeError("the head's job API did not come up in 120 s")


def _genstress(*args, env, cwd=None):
    return subprocess.run([sys.executable, "-m", "genstress_ray.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def campaign_dir(tiny_config, tmp_path):
    """A working directory holding the campaign's config, as a user would submit it from."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "campaign.yaml").write_text(yaml.safe_dump({k: v for k, v in tiny_config.items() if k != "run_id"}))
    return work


@pytest.mark.slow
def test_submit_follow_find_the_run_refuse_a_duplicate_list_and_stop(ray_head, campaign_dir, tiny_config):
    address, env = ray_head
    runs = Path(tiny_config["output"])
    done = _genstress("submit", "campaign.yaml", "--address", address, "--run-id", "nightly-1",
                      "--credentials-env", "RAY_AUTH_MODE", "--follow", env=env, cwd=campaign_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job = submission_id("test", "nightly-1")
    assert f"{job}: SUCCEEDED" in done.stdout
    assert "identify" in done.stdout  # the job's own log, streamed
    manifest = json.loads((runs / "test" / "nightly-1" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    # The same run again is refused by Ray, and said so; nothing of the run changes.
    before = {p: p.stat().st_mtime_ns for p in (runs / "test" / "nightly-1").rglob("*") if p.is_file()}
    again = _genstress("submit", "campaign.yaml", "--address", address, "--run-id", "nightly-1", env=env,
                       cwd=campaign_dir)
    assert again.returncode == 2 and "was submitted before (status SUCCEEDED)" in again.stderr, again.stderr
    assert {p: p.stat().st_mtime_ns for p in (runs / "test" / "nightly-1").rglob("*") if p.is_file()} == before
    # A job that needs credentials the cluster lacks fails early, naming them and no value.
    missing = _genstress("submit", "campaign.yaml", "--address", address, "--run-id", "no-creds",
                         "--credentials-env", "GENSTRESS_NO_SUCH_SECRET", "--wait", env=env, cwd=campaign_dir)
    assert missing.returncode == 1 and "GENSTRESS_NO_SUCH_SECRET not set" in missing.stdout, missing.stdout[-2000:]
    assert not (runs / "test" / "no-creds").exists()
    # A run is stopped, then resumed under the same id.
    started = _genstress("submit", "campaign.yaml", "--address", address, "--run-id", "stopped", env=env,
                         cwd=campaign_dir)
    assert started.returncode == 0, started.stderr
    stopped = _genstress("stop", submission_id("test", "stopped"), "--address", address, env=env)
    assert stopped.returncode == 0 and stopped.stdout.split()[-1] in ("STOPPED", "SUCCEEDED"), stopped.stderr
    listing = _genstress("jobs", "--address", address, env=env)
    lines = {line.split()[0]: line for line in listing.stdout.splitlines()}
    assert "SUCCEEDED" in lines[job] and str(runs / "test" / "nightly-1") in lines[job]
    assert "FAILED" in lines[submission_id("test", "no-creds")]
    if stopped.stdout.split()[-1] == "SUCCEEDED":
        pytest.skip("the tiny campaign finished before the stop reached it: nothing left to resume")
    resumed = _genstress("submit", "campaign.yaml", "--address", address, "--run-id", "stopped", "--resume",
                         "--wait", env=env, cwd=campaign_dir)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads((runs / "test" / "stopped" / "manifest.json").read_text())["status"] == "complete"


def test_an_unreachable_cluster_is_named(campaign_dir):
    port, = _free_ports(1)
    out = _genstress("submit", "campaign.yaml", "--address", f"http://127.0.0.1:{port}", env=dict(os.environ),
                     cwd=campaign_dir)
    assert out.returncode == 2 and f"cannot reach the Ray cluster at 'http://127.0.0.1:{port}'" in out.stderr


@pytest.mark.parametrize("change, message", [
    ({"output": "genstress-runs"}, "output: 'genstress-runs' is relative"),
    ({"ray": {"num_cpus": 2}}, "ray.num_cpus: a submitted campaign joins the cluster"),
    ({"storage_options": {"secret": "s3cr3t"}}, "storage_options: secret look like credentials"),
])
def test_a_campaign_the_cluster_cannot_run_is_refused_before_submission(campaign_dir, tiny_config, change, message):
    (campaign_dir / "bad.yaml").write_text(yaml.safe_dump({**tiny_config, **change}))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        plan(str(campaign_dir / "bad.yaml"), str(campaign_dir))


def test_the_config_must_be_shipped_with_the_working_dir(campaign_dir, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ConfigError, match="inside the working directory"):
        plan(str(campaign_dir / "campaign.yaml"), str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match="is not a folder"):
        plan(str(campaign_dir / "campaign.yaml"), str(tmp_path / "missing"))


def test_the_job_is_the_campaign_run_under_an_id_from_campaign_and_run(campaign_dir, tiny_config):
    _, job = plan(str(campaign_dir / "campaign.yaml"), str(campaign_dir), run_id="2026-12-06",
                  credentials_env=("AWS_SECRET_ACCESS_KEY",))
    assert job.submission_id == "genstress-test-2026-12-06"
    assert job.run_uri == f"{tiny_config['output']}/test/2026-12-06"
    assert job.entrypoint.split()[:6] == ["python", "-m", "genstress_ray.cli", "run", "campaign.yaml", "--run-id"]
    assert "--require-env AWS_SECRET_ACCESS_KEY" in job.entrypoint
