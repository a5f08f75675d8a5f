"""Runs people can trust: one writer, one config, no code from the run folder, findable, clean exits."""

import copy
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow.compute as pc
import pytest
import yaml

from genstress_ray.cli import main
from genstress_ray.config import ConfigError
from genstress_ray.lease import DEFAULT_TTL, LeaseHeld, RunLease, read_lease
from genstress_ray.pipeline import run_campaign
from genstress_ray.runs import config_differences, list_runs, run_status
from genstress_ray.storage import RunStore


def _cli(args, cwd, timeout=300, **popen):
    """``genstress ARGS`` as a user types it, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "genstress_ray.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, **popen)


@pytest.fixture
def config_file(tiny_config, tmp_path):
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    return path


# ---- one writer per run -----------------------------------------------------------------------
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_driver_is_refused_while_the_lease_is_held(where, tiny_config, tmp_path, request):
    """A process holds the run's lease; `genstress run` on the same run id exits 2 naming the holder and
    when its lease expires, and writes nothing."""
    output = tiny_config["output"] if where == "local" else request.getfixturevalue("s3_bucket") + "/runs"
    cfg = {**tiny_config, "output": output}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    store = RunStore(output, cfg["campaign"], cfg["run_id"])
    with RunLease.for_store(store) as held:
        proc = _cli(["run", str(path)], tmp_path, env=os.environ)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"is being written by {held.holder}" in proc.stderr and "lease expires" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not store.fs.exists(store.stage_path("identify"))
    assert read_lease(store.fs, store.path) is None  # released


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_drivers_started_together_write_each_row_once(where, config_file, tiny_config, tmp_path, request):
    if where == "s3":
        tiny_config = {**tiny_config, "output": request.getfixturevalue("s3_bucket") + "/runs"}
        config_file.write_text(yaml.safe_dump(tiny_config))
    procs = [subprocess.Popen([sys.executable, "-m", "genstress_ray.cli", "run", str(config_file)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in outs)
    refused = [err for rc, _, err in outs if rc == 2]
    # Either the second was refused by the lease, or it started after the first had finished and
    # found every stage complete. Both drivers never write.
    assert codes in ([0, 2], [0, 0]), [err[-1500:] for _, _, err in outs]
    if codes == [0, 0]:
        assert any("resumed: skipped finished stages identify, regions, region_samples" in out for _, out, _ in outs)
    else:
        assert "is being written by" in refused[0]
    store = RunStore(tiny_config["output"], "test", "r1")
    ids = store.read_table("identify", columns=["sample_id"])["sample_id"]
    assert len(ids) == len(pc.unique(ids)) == store.marker("identify")["samples"]


def test_an_expired_lease_is_taken_over_and_the_old_holder_cannot_commit(tmp_path):
    store = RunStore(str(tmp_path), "c", "r")
    store.fs.makedirs(store.path, exist_ok=True)
    crashed = RunLease.for_store(store, ttl=0.5).acquire()
    crashed._stop.set()  # its heartbeat stops, as when the driver dies
    with pytest.raises(LeaseHeld, match="lease expires"):
        RunLease.for_store(store).acquire()
    time.sleep(0.7)
    with RunLease.for_store(store) as successor:
        assert read_lease(store.fs, store.path)["holder"] == successor.holder
        with pytest.raises(LeaseHeld, match="lost the lease"):
            crashed.check()
        successor.check()


def test_a_lease_on_s3_is_taken_over_only_once(s3_bucket):
    store = RunStore(s3_bucket + "/runs", "c", "r")
    old = RunLease.for_store(store, ttl=0.3).acquire()
    old._stop.set()
    time.sleep(0.5)
    first = RunLease.for_store(store)
    first.acquire()
    with pytest.raises(LeaseHeld):
        RunLease.for_store(store).acquire()
    with pytest.raises(LeaseHeld):
        old.check()
    first.release()
    assert read_lease(store.fs, store.path) is None


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("content", [b"", b"{not json", b'{"holder": 7}', b'{"holder": "x:1:a", "expires_at": "soon"}',
                                     b'{"holder": "elsewhere:1:a", "expires_at": 9.0e12}',
                                     b'{"holder": "elsewhere:1:a", "expires_at": 1e400}'],
                         ids=["empty", "garbled", "no-expiry", "text-expiry", "year-287168", "infinite"])
def test_a_damaged_or_far_future_lease_locks_a_run_for_one_ttl_at_most(where, content, tmp_path, request):
    """The lease file is in the run folder: whoever can write there can leave it empty, garbled or
    expiring in year 287168. Each counts as held for one ttl after it was written, then expired; no
    contender crashes, and listings name it."""
    output = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket") + "/runs"
    store = RunStore(output, "c", "r")
    store.fs.makedirs(store.path, exist_ok=True)
    store.fs.pipe_file(f"{store.path}/_LEASE", content)
    with pytest.raises(LeaseHeld, match="unreadable lease file|elsewhere:1:a"):
        RunLease.for_store(store, ttl=1.5).acquire()
    listed = read_lease(store.fs, store.path)
    assert listed is not None and listed["expires_at"] <= time.time() + DEFAULT_TTL + 5
    time.sleep(1.7)
    with RunLease.for_store(store, ttl=1.5) as taker:
        taker.check()
        assert read_lease(store.fs, store.path)["holder"] == taker.holder


def test_contenders_for_a_lease_never_crash_and_exactly_one_wins(tmp_path):
    """Contenders used to read the lease between its creation and its write (JSONDecodeError)."""
    for round_ in range(15):
        store = RunStore(str(tmp_path), "c", f"r{round_}")
        store.fs.makedirs(store.path, exist_ok=True)
        outcomes, leases = [], [RunLease.for_store(store) for _ in range(8)]

        def contend(lease):
            try:
                lease.acquire()
                outcomes.append("won")
            except LeaseHeld:
                outcomes.append("refused")
            except Exception as exc:  # what must not happen
                outcomes.append(repr(exc))

        threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for lease in leases:
            lease.release()
        assert outcomes.count("won") == 1 and outcomes.count("refused") == 7, outcomes


# ---- damage is found, never adopted ------------------------------------------------------------
@pytest.mark.usefixtures("ray_cluster")
def test_shards_rewritten_with_fewer_rows_or_truncated_are_named_and_computed_again(tiny_config, tmp_path, capsys):
    """Two shards rewritten as valid Parquet with fewer rows lost their rows without a word (status
    still counted them, labels used the rest, a rerun kept them); a truncated one gave tracebacks."""
    import pyarrow.parquet as pq

    from genstress_ray.storage import StorageError

    result = run_campaign(tiny_config)
    store = RunStore.from_uri(result.run_uri)
    before = {stage: store.read_table(stage) for stage in ("identify", "region_samples")}
    shard = store.parquet_files("identify")[0]
    table = pq.read_table(shard)  # keeps the file's metadata, as a careless rewrite would
    assert table.num_rows >= 2
    pq.write_table(table.slice(0, 1), shard)
    truncated = store.parquet_files("region_samples")[-1]
    data = store.fs.cat_file(truncated)
    store.fs.pipe_file(truncated, data[: len(data) // 2])
    with pytest.raises(StorageError, match=f"identify stage of .* is damaged: {shard}: holds 1 rows, "
                                           f"written with {table.num_rows}"):
        store.read_table("identify")
    with pytest.raises(StorageError, match=f"{truncated}: not a readable Parquet file"):
        store.read_table("region_samples")
    assert main(["status", result.run_uri]) == 0
    out = capsys.readouterr().out
    assert f"damaged: {shard}: holds 1 rows" in out and f"damaged: {truncated}: not a readable" in out
    assert "1 damaged file(s), computed again by a rerun" in out
    again = run_campaign(tiny_config)  # the damaged files computed again, the same rows as before
    assert again.skipped == ["regions"]
    for stage, table in before.items():
        assert store.read_table(stage).equals(table) and not store.damaged_files(stage)


@pytest.mark.usefixtures("ray_cluster")
def test_a_run_without_its_manifest_adopts_only_the_stages_its_own_config_made(tiny_config):
    """With manifest.json deleted, a rerun with draws changed adopted the other draws' tables as its
    own, and the manifest then said the new draws."""
    result = run_campaign(tiny_config)
    store = RunStore.from_uri(result.run_uri)
    identify = store.read_table("identify")
    store.fs.rm(f"{store.path}/manifest.json")
    changed = {**tiny_config, "strategy": {**tiny_config["strategy"], "draws": 5}}
    with pytest.raises(ConfigError, match="stage identify of run .* was made by another config .* manifest is "
                                          "missing: its tables are not this config's. Use a new run id"):
        run_campaign(changed)
    assert store.read_table("identify").equals(identify)
    assert run_campaign(tiny_config).skipped == ["identify", "regions", "region_samples"]  # its own: kept


# ---- a run id means one config ---------------------------------------------------------------
@pytest.mark.usefixtures("ray_cluster")
def test_rerunning_a_run_id_with_another_config_is_refused_and_changes_nothing(tiny_config):
    result = run_campaign(tiny_config)
    store = RunStore.from_uri(result.run_uri)
    before = store.read_manifest()
    changed = {**tiny_config, "strategy": {**tiny_config["strategy"], "draws": 5}}
    with pytest.raises(ConfigError, match=r"differs in: strategy.draws \(8 -> 5\)"):
        run_campaign(changed)
    assert store.read_manifest() == before
    # Where it runs and on what resources may change.
    moved = {**tiny_config, "resources": {"search": {"actors": 1, "num_cpus": 0.25, "batch_size": 8}}}
    assert run_campaign(moved).skipped == ["identify", "regions", "region_samples"]


def test_config_differences_skip_only_relocatable_fields():
    old = {"output": "/a", "run_id": "r", "resources": {"x": 1}, "strategy": {"a": 1, "b": 2}, "seed": 0}
    new = {"output": "s3://b", "run_id": "r2", "resources": {"x": 2}, "strategy": {"a": 1, "b": 3}, "seed": 1}
    assert config_differences(old, new) == ["seed (0 -> 1)", "strategy.b (2 -> 3)"]


def test_a_field_added_since_the_run_was_made_takes_its_default_and_is_no_difference(tiny_config):
    from genstress_ray.config import load_config
    from genstress_ray.runs import refuse_differences

    new = load_config(tiny_config).model_dump(mode="json")
    stored = copy.deepcopy(new)
    del stored["correction"]["select_by"]  # as a run made before the field existed stored it
    refuse_differences(stored, new, "differs")
    changed = copy.deepcopy(new)
    changed["correction"]["select_by"] = "real_region"
    with pytest.raises(ConfigError, match="differs; it differs in: correction.select_by"):
        refuse_differences(stored, changed, "differs")


# ---- no code from a run folder ------------------------------------------------------------------
@pytest.mark.usefixtures("ray_cluster")
def test_a_factory_planted_in_a_manifest_is_never_imported(tiny_config, tmp_path, capsys):
    """Whoever can write the bucket plants `factory: os:system` in the run's config; labelling,
    correcting and assessing the run refuse it and run nothing."""
    result = run_campaign(tiny_config)
    store = RunStore.from_uri(result.run_uri)
    marker = tmp_path / "pwned"
    manifest = store.read_manifest()
    manifest["config"]["oracle"] = {"uri": "x.pt", "format": "state_dict", "factory": "os:system",
                                    "params": {"command": f"touch {marker}"}, "architecture": None, "train": {}}
    store.write_manifest(manifest)
    for command in (["label", result.run_uri, "--oracle"], ["correct", result.run_uri], ["assess", result.run_uri]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "names code to import (oracle.factory: 'os:system')" in err and "--config" in err, err
    assert not marker.exists()
    # A config of the user's own that differs from the run's is no way around it.
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump(tiny_config))
    assert main(["label", result.run_uri, "--oracle", "--config", str(mine)]) == 2
    assert "differs in: oracle" in capsys.readouterr().err
    assert not marker.exists()


# ---- runs can be found again ------------------------------------------------------------------------
@pytest.mark.usefixtures("ray_cluster")
def test_runs_and_status_list_what_a_rerun_would_do(tiny_config, capsys):
    run_campaign(tiny_config, stop_after="identify")
    runs = list_runs(tiny_config["output"])
    assert [(r["campaign"], r["run_id"], r["status"]) for r in runs] == [("test", "r1", "stopped after identify")]
    status = run_status(RunStore(tiny_config["output"], "test", "r1"))
    assert status["stages"]["identify"]["done"] and status["stages"]["identify"]["rows"]["samples"] > 0
    assert status["stages"]["regions"]["next"] == "made by genstress run"
    assert main(["runs", tiny_config["output"]]) == 0
    out = capsys.readouterr().out
    assert "r1" in out and "stopped after identify" in out and "identify" in out
    assert main(["status", f"{tiny_config['output']}/test/r1"]) == 0
    out = capsys.readouterr().out
    assert "lease: free" in out and "regions         not done" in out


def test_status_tells_a_run_whose_driver_died_from_a_running_one(tiny_config, tmp_path, capsys):
    """The manifest says "running" while a driver works; when no live driver holds the run's lease
    (it was killed), status says the run was interrupted instead."""
    import socket

    store = RunStore(tiny_config["output"], "test", "r1")
    store.fs.makedirs(store.path, exist_ok=True)
    store.write_manifest({"config": {"campaign": "test"}, "status": "running", "created_at": time.time()})
    assert run_status(store)["status"].startswith("interrupted (its driver is gone")
    with RunLease.for_store(store):  # a live driver
        assert run_status(store)["status"] == "running"
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process of this host that no longer exists held the lease (a SIGKILLed driver)
    lease = {"holder": f"{socket.gethostname()}:{gone.pid}:abc", "expires_at": time.time() + 100}
    (tmp_path / "runs" / "test" / "r1" / "_LEASE").write_text(json.dumps(lease))
    assert run_status(store)["status"].startswith("interrupted")
    assert main(["status", store.uri]) == 0
    assert "status interrupted (its driver is gone; rerun to resume)" in capsys.readouterr().out


@pytest.fixture
def library_log(caplog):
    """caplog on the genstress_ray logger itself (an in-process CLI call stops it propagating)."""
    library = logging.getLogger("genstress_ray")
    library.addHandler(caplog.handler)
    yield caplog
    library.removeHandler(caplog.handler)


@pytest.mark.usefixtures("ray_cluster")
def test_api_users_see_progress_through_a_callback_or_the_logger(tiny_config, library_log):
    caplog = library_log
    events = []
    with caplog.at_level(logging.INFO, logger="genstress_ray"):
        run_campaign(tiny_config, progress=events.append)
    finals = {e.stage: e for e in events if e.final}
    assert set(finals) == {"identify", "region_samples"}
    assert finals["identify"].done == finals["identify"].total == 48 and "48/48 rows (100%)" in finals["identify"].line()
    assert all(0 <= e.done <= e.total for e in events)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("genstress_ray")]
    assert any(m.startswith("stage identify: done") for m in messages)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="genstress_ray"):
        run_campaign({**tiny_config, "run_id": "r2"})  # no callback: the progress lines are log records
    assert any(r.name == "genstress_ray.progress" and "identify: 48/48 rows (100%)" in r.getMessage()
               for r in caplog.records)


# ---- interrupts, failures and processes -----------------------------------------------------------
def _session_processes(sid: int) -> list[str]:
    """Command lines of the live processes in session ``sid`` (the run's own session)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    cmdline = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode()
                    status = open(f"/proc/{entry}/status").read()
                    if "State:\tZ" not in status:  # zombies are gone already, bar their parent's wait
                        found.append(cmdline)
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                pass
    return found


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_ends_within_seconds_with_one_line_and_the_resume_command(how, config_file, tiny_config, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM to the driver (what
    genstress stop, Kubernetes and schedulers send; Ray's own handler used to print and exit 15)
    mid-stage: one line that names the exact resuming command, within seconds, the lease released,
    and no process of the run outlives it."""
    cfg = {**tiny_config, "run_id": None, "strategy": {**tiny_config["strategy"], "draws": 4000}}
    config_file.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "genstress_ray.cli", "run", str(config_file)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any((tmp_path / "runs" / "test").glob("*/identify")):
        time.sleep(0.2)
    time.sleep(2)
    t0 = time.time()
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    took = time.time() - t0
    assert proc.returncode == (130 if how == "ctrl-c" else 143), err[-2000:]
    assert took < 15, took
    assert "Traceback" not in err and "SIGTERM received" not in err, err[-3000:]
    run_id = next((tmp_path / "runs" / "test").iterdir()).name
    said = "interrupted" if how == "ctrl-c" else "terminated (SIGTERM)"
    assert f"{said}; to resume, run: genstress run {config_file} --run-id {run_id}" in err
    store = RunStore(str(tmp_path / "runs"), "test", run_id)
    assert read_lease(store.fs, store.path) is None  # released: a rerun need not wait for it
    time.sleep(3)
    assert not _session_processes(proc.pid), _session_processes(proc.pid)


def test_a_sigkilled_driver_leaves_no_process_behind(config_file, tiny_config, tmp_path):
    """SIGKILL gives the driver no chance to shut Ray down; its watchdog ends what the run started
    (Ray's dashboard and runtime-env agents lived on for minutes before)."""
    cfg = {**tiny_config, "strategy": {**tiny_config["strategy"], "draws": 4000}}
    config_file.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "genstress_ray.cli", "run", str(config_file)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "runs" / "test" / "r1" / "identify").exists():
        time.sleep(0.2)
    time.sleep(2)
    assert _session_processes(proc.pid)  # Ray's processes run in the driver's session
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.time() + 20
    while time.time() < deadline and _session_processes(proc.pid):
        time.sleep(0.5)
    assert not _session_processes(proc.pid), _session_processes(proc.pid)

    def watchdogs():
        return [p for p in os.listdir("/proc") if p.isdigit() and f"cleanup.py {proc.pid} " in _cmdline(p)]

    while time.time() < deadline + 10 and watchdogs():
        time.sleep(0.5)
    assert not watchdogs()  # the watchdog itself ends once its work is done


def test_a_driver_killed_mid_identify_resumes_computing_only_the_unwritten_shards(tiny_config, tmp_path):
    """Kill -9 mid-identify, rerun: the rows equal an uninterrupted run's, no shard is computed twice,
    and the dead driver's lease (its process gone from this host) is taken over at once."""
    cfg = {**tiny_config, "shard_rows": 4, "strategy": {**tiny_config["strategy"], "draws": 3000}}
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(cfg))
    identify = tmp_path / "runs" / "test" / "r1" / "identify"
    proc = subprocess.Popen([sys.executable, "-m", "genstress_ray.cli", "run", str(path), "--until", "identify"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and len(list(identify.glob("shard-*.parquet"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.time() + 30
    while time.time() < deadline and _session_processes(proc.pid):
        time.sleep(0.5)
    written = len(list(identify.glob("shard-*.parquet")))
    assert 3 <= written < 12 and not (identify / "_COMPLETE").exists()  # 48 images, 4 per shard

    resumed = _cli(["run", str(path), "--until", "identify"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    store = RunStore(str(tmp_path / "runs"), "test", "r1")
    info = store.marker("identify")
    assert (info["shards"], info["shards_reused"], info["shards_computed"]) == (12, written, 12 - written)

    run_campaign(cfg, run_id="clean", stop_after="identify")
    clean_store = RunStore(str(tmp_path / "runs"), "test", "clean")
    columns = ["sample_id", "pred", "fault", "latent"]
    assert store.read_table("identify", columns=columns).equals(clean_store.read_table("identify", columns=columns))
    counts = ("candidates", "faults", "nonfinite_dropped", "samples")
    assert {k: info.get(k) for k in counts} == {k: clean_store.marker("identify").get(k) for k in counts}


def _cmdline(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_finished_run_leaves_no_process_behind(config_file, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "genstress_ray.cli", "run", str(config_file)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    time.sleep(3)
    assert not _session_processes(proc.pid), _session_processes(proc.pid)
    # Readable output: no Ray progress blocks, core-worker lines or tracebacks by default.
    assert "Traceback" not in err and "core_worker" not in err and "Dataset" not in err and " INFO " not in err
    assert "not writable" not in err and "Warning" not in err and "Exception ignored" not in err
    assert "genstress: stage identify: done" in err and "identify: 48/48 rows (100%)" in err


def test_a_storage_failure_mid_stage_is_one_error_line_with_the_resume_command(config_file, tiny_config, tmp_path):
    """The stage's folder becomes unwritable while the stage runs: one error line naming the stage and
    the run, the command that resumes, and nothing marked complete."""
    run_dir = tmp_path / "runs" / "test" / "r1"
    proc = subprocess.Popen([sys.executable, "-m", "genstress_ray.cli", "run", str(config_file)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "identify").exists():
        time.sleep(0.05)
    (run_dir / "identify").rmdir()
    (run_dir / "identify").write_text("the store lost the folder")  # every write below it now fails
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"stage identify of run {run_dir} failed" in errors[0], err[-2000:]
    assert f"to resume, run: genstress run {config_file} --run-id r1" in err
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "running"
    assert not list(run_dir.glob("*/_COMPLETE"))
