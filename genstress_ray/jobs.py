"""Campaigns as Ray jobs: submit one to a cluster, follow it, list the campaigns a cluster ran, stop one.

The job's entrypoint is ``genstress run`` on the cluster, under a submission id derived from the
campaign and run id, so the same run (a nightly scan's date, say) cannot be submitted twice: Ray
refuses the second and we say which job holds it. Object-storage credentials stay on the cluster: a
job names the environment variables it needs, the entrypoint checks they are set there, and no value
ever enters the job's metadata or runtime environment.

    genstress submit jobs/digits_defuse.yaml --address http://head:8265 --output s3://bucket/runs --follow
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from genstress_ray.config import CampaignConfig, ConfigError, load_config

# Metadata keys a genstress job carries (Ray keeps them with the job; values must be strings).
META_CAMPAIGN, META_RUN_ID, META_RUN_URI, META_ENV = ("genstress_campaign", "genstress_run_id", "genstress_run_uri",
                                                      "genstress_credentials_env")
FINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}
# storage_options keys whose values are secrets: they belong in the cluster's environment, not in a config.
SECRET_KEYS = re.compile(r"(key|secret|token|password|credential)", re.I)


class JobError(Exception):
    """A cluster that cannot be reached, a job that cannot be submitted, found or stopped."""


@dataclass(frozen=True)
class Submission:
    submission_id: str
    run_id: str
    run_uri: str
    entrypoint: str
    working_dir: str  # resolved: shipped as the job's runtime_env
    credentials_env: tuple[str, ...] = ()


def submission_id(campaign: str, run_id: str) -> str:
    """The job's id: one per campaign run, so a second trigger of the same run is refused by Ray."""
    return "genstress-" + re.sub(r"[^A-Za-z0-9._-]", "-", f"{campaign}-{run_id}")


def connect(address: str):
    """A ``JobSubmissionClient`` for the cluster's dashboard address, or a JobError naming the address."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # Ray raises ConnectionError, ValueError or RuntimeError by cause
        raise JobError(f"cannot reach the Ray cluster at {address!r} (its dashboard address, e.g. "
                       f"http://head:8265): {exc}") from None


def plan(config_path: str, working_dir: str = ".", output: str | None = None, run_id: str | None = None,
         credentials_env: tuple[str, ...] = ()) -> tuple[CampaignConfig, Submission]:
    """Check a campaign for the cluster and build its job: everything that can fail does so here,
    before anything is submitted."""
    import fsspec
    import yaml

    from genstress_ray.pipeline import new_run_id

    cfg = load_config(config_path, output=output, run_id=run_id)
    root, config = Path(working_dir).resolve(), Path(config_path).resolve()
    if not root.is_dir():
        raise ConfigError(f"--working-dir {working_dir!r} is not a folder")
    if not config.is_relative_to(root):
        raise ConfigError(f"{config_path}: the config must lie inside the working directory shipped to the "
                          f"cluster ({root}); pass --working-dir")
    # As written, not as resolved here: a relative output would land in the job's temporary folder.
    written = output or (yaml.safe_load(config.read_text()) or {}).get("output") or "genstress-runs"
    if fsspec.utils.get_protocol(written) == "file" and not os.path.isabs(written.removeprefix("file://")):
        raise ConfigError(f"output: {written!r} is relative, and a job runs in a temporary folder on the "
                          "cluster; give an object-storage URI or an absolute path on the cluster (--output)")
    for name in ("address", "num_cpus", "object_store_memory"):
        if getattr(cfg.ray, name) is not None:
            raise ConfigError(f"ray.{name}: a submitted campaign joins the cluster it is submitted to; remove it")
    secrets = sorted(k for k in cfg.storage_options if SECRET_KEYS.search(k))
    if secrets:
        raise ConfigError(f"storage_options: {', '.join(secrets)} look like credentials; leave them out and name "
                          "the cluster's environment variables that hold them (--credentials-env NAME)")
    bad = [n for n in credentials_env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
    if bad:
        raise ConfigError(f"--credentials-env takes environment variable names, not {bad}")
    rid = cfg.run_id or new_run_id()
    command = ["python", "-m", "genstress_ray.cli", "run", config.relative_to(root).as_posix(), "--run-id", rid,
               "--output", written] + [a for n in credentials_env for a in ("--require-env", n)]
    return cfg, Submission(submission_id(cfg.campaign, rid), rid, f"{written.rstrip('/')}/{cfg.campaign}/{rid}",
                           shlex.join(command), str(root), tuple(credentials_env))


def submit(client, cfg: CampaignConfig, job: Submission, pip: tuple[str, ...] = (), resume: bool = False) -> str:
    """Submit the planned job. A run submitted before is refused with the job that holds it, unless
    ``resume`` and that job failed or was stopped: its record is deleted and the run resubmitted, and
    ``genstress run`` resumes it from what it finished."""
    runtime_env: dict = {"working_dir": job.working_dir}
    if pip:
        runtime_env["pip"] = list(pip)
    metadata = {META_CAMPAIGN: cfg.campaign, META_RUN_ID: job.run_id, META_RUN_URI: job.run_uri,
                META_ENV: ",".join(job.credentials_env)}
    if resume:
        _release(client, job.submission_id)
    try:
        return client.submit_job(entrypoint=job.entrypoint, submission_id=job.submission_id, runtime_env=runtime_env,
                                 metadata=metadata, entrypoint_num_cpus=cfg.ray.entrypoint_num_cpus,
                                 entrypoint_num_gpus=cfg.ray.entrypoint_num_gpus)
    except RuntimeError as exc:
        if "already exists" in str(exc):
            status = client.get_job_status(job.submission_id)
            raise JobError(f"{job.submission_id} was submitted before (status {status.value}): campaign "
                           f"{cfg.campaign!r} run {job.run_id!r} runs once; pass another --run-id to "
                           "run it again, or --resume if it failed or was stopped") from None
        raise JobError(f"the cluster refused {job.submission_id}: {exc}") from None


def _release(client, job_id: str) -> None:
    """Forget a failed or stopped job so its run can be submitted again."""
    try:
        status = client.get_job_status(job_id).value
    except RuntimeError:
        return  # never submitted: nothing to release
    if status not in ("FAILED", "STOPPED"):
        raise JobError(f"{job_id} is {status}: only a failed or stopped run is resumed")
    client.delete_job(job_id)


def follow(client, job_id: str, logs: bool = True, out=sys.stdout, poll: float = 1.0) -> str:
    """Wait for the job to end, streaming its logs to ``out`` if asked; returns the final status."""
    if logs:
        async def stream():
            async for chunk in client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()
        asyncio.run(stream())
    while (status := client.get_job_status(job_id).value) not in FINAL:
        time.sleep(poll)
    return status


def genstress_jobs(client) -> list[dict]:
    """The campaign jobs the cluster knows, oldest first: id, status, campaign, run id and URI, times."""
    rows = []
    for job in client.list_jobs():
        meta = job.metadata or {}
        if META_RUN_URI not in meta:
            continue
        rows.append({"submission_id": job.submission_id, "status": job.status.value,
                     "campaign": meta[META_CAMPAIGN], "run_id": meta[META_RUN_ID], "run_uri": meta[META_RUN_URI],
                     "start_time": job.start_time, "end_time": job.end_time, "message": job.message or ""})
    return sorted(rows, key=lambda r: r["start_time"] or 0)


def stop(client, job_id: str, timeout: float = 60.0, poll: float = 0.5) -> str:
    """Stop a job and wait (up to ``timeout`` seconds) until it has ended; returns its status then."""
    try:
        client.stop_job(job_id)
    except RuntimeError as exc:
        raise JobError(f"cannot stop {job_id}: {exc}") from None
    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job_id).value) not in FINAL and time.monotonic() < deadline:
        time.sleep(poll)
    return status
