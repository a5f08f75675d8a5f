"""genstress scan: a registry's newest version scanned night after night, its regions tracked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from genstress_ray.data import get_source
from genstress_ray.lease import LeaseHeld, RunLease
from genstress_ray.models import ModelError, get_model, save_checkpoint
from genstress_ray.models.training import train_classifier
from genstress_ray.scan import ScanError, main_scan, run_scan
from genstress_ray.scan.run import RECORD, REPORT, STARTED

from conftest import TINY_CNN, TINY_VAE

CNN = {**TINY_CNN, "width": 8, "hidden": 32}


def _classifier(path, epochs: int, seed: int, params=CNN) -> None:
    model, _ = train_classifier(get_source("digits", split="train").load(), None, "small_cnn", params,
                                epochs=epochs, lr=3e-3, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, str(path), "small_cnn", params)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """v1: under-trained (2 epochs); v2: trained 15 epochs; an oracle (another seed); a tiny random VAE."""
    root = tmp_path_factory.mktemp("scan-models")
    _classifier(root / "v1.safetensors", 2, 0)
    _classifier(root / "v2.safetensors", 15, 2)
    _classifier(root / "oracle.safetensors", 15, 1)
    torch.manual_seed(0)
    save_checkpoint(get_model("beta_vae", **TINY_VAE), str(root / "vae.safetensors"), "beta_vae", TINY_VAE)
    return {name: root / f"{name}.safetensors" for name in ("v1", "v2", "oracle", "vae")}


@pytest.fixture
def scan_config(models, tmp_path) -> str:
    """A scan of a registry holding v1 only, with one small Defuse campaign (its own file)."""
    campaign = {"campaign": "digits", "cache": str(tmp_path / "cache"),
                "data": {"search": {"kind": "digits", "split": "test", "limit": 48, "share": [0.0, 0.5]}},
                "checks": {"accept_low_fidelity": True},  # a random VAE: its reconstructions are noise
                "classifier": {"architecture": "small_cnn"}, "generator": {"uri": str(models["vae"])},
                "oracle": {"uri": str(models["oracle"])},
                "strategy": {"name": "defuse", "preset": "reference", "a": 1.0, "b": 1.0, "draws": 8,
                             "max_faults_per_image": 3},
                "reduce": {"max_components": 10, "samples_per_region": 4, "max_iter": 100},
                "correction": {"finetune_per_region": 4, "test_per_region": 16},
                "resources": {"search": {"actors": 1, "num_cpus": 0.5, "batch_size": 16},
                              "region_samples": {"actors": 1, "num_cpus": 0.5, "batch_size": 16}}}
    (tmp_path / "digits.yaml").write_text(yaml.safe_dump(campaign))
    register(tmp_path / "registry", "v1", models["v1"])
    scan = {"scan": "nightly", "registry": str(tmp_path / "registry"), "output": str(tmp_path / "scans"),
            "campaigns": ["digits.yaml"], "alert": {"regressed": True, "accuracy_drop": None}}
    (tmp_path / "scan.yaml").write_text(yaml.safe_dump(scan))
    return str(tmp_path / "scan.yaml")


def register(registry, version: str, checkpoint) -> None:
    (registry / version).mkdir(parents=True)
    shutil.copy(checkpoint, registry / version / "model.safetensors")


def by_id(result) -> dict:
    return {r["id"]: r for r in result.record["regions"]}


def _expected(entry: dict) -> str:
    """A tracked region's status after its first night, from the evidence its history entry records."""
    generated_passes = entry["accuracy"] is not None and entry["accuracy"] >= 0.9
    if entry["matched"] or not generated_passes:
        return "failing"
    real_passes = entry["real_subgroup_n"] >= 10 and entry["real_subgroup"] >= 0.9
    return "fixed" if real_passes else "fixed on generated samples only"


@pytest.mark.slow
def test_four_nights_track_regions_under_one_id_then_fixed_then_regressed(ray_cluster, scan_config, models, tmp_path):
    first = run_scan(scan_config, "2026-12-01")
    regions = by_id(first)
    assert regions and {r["status"] for r in regions.values()} == {"new"}
    assert first.record["strategies"]["digits"]["failure_regions"] == len(regions)
    assert all(r["history"][0]["n"] == 16 and r["history"][0]["version"] == "v1" for r in regions.values())
    assert first.alerts == []  # new regions alert only above new_region_faults, unset here

    # The same version on the next night: nothing is new, every failure region is found again.
    again = run_scan(scan_config, "2026-12-02")
    assert again.record["version"]["version"] == "v1"
    assert again.record["strategies"]["digits"]["new"] == 0
    assert {r["status"] for r in again.record["regions"]} == {"persisting"}
    assert set(by_id(again)) == set(regions)
    assert all(r["history"][-1]["matched"] for r in again.record["regions"])

    register(tmp_path / "registry", "v2", models["v2"])
    second = run_scan(scan_config, "2026-12-03")
    assert second.record["version"]["version"] == "v2" and second.record["previous"] == "2026-12-02"
    tracked = by_id(second)
    assert set(regions) <= set(tracked)
    for rid in regions:
        expected = _expected(tracked[rid]["history"][-1])
        assert tracked[rid]["status"] == ("persisting" if expected == "failing" else expected)
    fixed = [rid for rid in regions if tracked[rid]["status"].startswith("fixed")]
    assert fixed, "the well-trained v2 fixes at least one region of the 2-epoch v1"

    # v3 is v1 again: every region v2 fixed fails again, with v1's very accuracy.
    register(tmp_path / "registry", "v3", models["v1"])
    assert main_scan(scan_config, "2026-12-04", None) == 3  # an alert fires: regressed regions
    third = json.loads((tmp_path / "scans/nightly/2026-12-04" / RECORD).read_text())
    back = {r["id"]: r for r in third["regions"]}
    for rid in fixed:
        first_entry, now = regions[rid]["history"][0], back[rid]["history"][-1]
        assert now["accuracy"] == pytest.approx(first_entry["accuracy"])
        assert back[rid]["status"] == ("regressed" if _expected(now) == "failing" else _expected(now))
    assert any(f"region {rid} regressed" in line for rid in fixed for line in third["alerts"])
    page = (tmp_path / "scans/nightly/2026-12-04" / REPORT).read_text()
    assert "regressed" in page and "v1" in page and "v3" in page and "data:image/png;base64" in page
    assert "real subgroup (held out)" in page

    # A second trigger of a finished night does nothing, and says which arguments it did not use.
    before = (tmp_path / "scans/nightly/2026-12-04" / RECORD).read_bytes()
    rerun = run_scan(scan_config, "2026-12-04")
    assert rerun.already_complete and rerun.unused == []
    assert (tmp_path / "scans/nightly/2026-12-04" / RECORD).read_bytes() == before
    (tmp_path / "other").mkdir()
    elsewhere = run_scan(scan_config, "2026-12-04", registry=str(tmp_path / "other"))
    assert elsewhere.already_complete and "registry" in elsewhere.unused[0] and "not used" in elsewhere.summary()


def test_bad_dates_and_history_are_refused_before_anything_is_written(scan_config, tmp_path):
    with pytest.raises(ScanError, match="in the future"):
        run_scan(scan_config, "2026-12-09", today=__import__("datetime").date(2026, 12, 6))
    with pytest.raises(ScanError, match="not a date"):
        run_scan(scan_config, "12/06/2026")
    night = tmp_path / "scans/nightly/2026-12-01"
    night.mkdir(parents=True)
    (night / STARTED).write_text(json.dumps({"version": {"version": "v1", "uri": "x"}}))
    with pytest.raises(ScanError, match="scan of 2026-12-01 .* is incomplete"):
        run_scan(scan_config, "2026-12-02")
    assert not (tmp_path / "scans/nightly/2026-12-02").exists()
    assert [p.name for p in night.iterdir()] == [STARTED]  # the earlier scan untouched
    (night / RECORD).write_text(json.dumps({"date": "2026-12-01"}))
    with pytest.raises(ScanError, match="scans after 2026-11-30"):
        run_scan(scan_config, "2026-11-30")


def test_versions_whose_classes_differ_are_refused(scan_config, models, tmp_path):
    night = tmp_path / "scans/nightly/2026-12-01"
    night.mkdir(parents=True)
    (night / RECORD).write_text(json.dumps({"date": "2026-12-01", "class_names": {"digits": ["cat", "dog"]}}))
    with pytest.raises(ScanError, match=r"campaign digits: its classes \['0', .* differ from the previous scan's"):
        run_scan(scan_config, "2026-12-02")
    shutil.rmtree(night)
    five = {**CNN, "num_classes": 5}
    save_checkpoint(get_model("small_cnn", **five), str(tmp_path / "five.safetensors"), "small_cnn", five)
    register(tmp_path / "registry", "v2", tmp_path / "five.safetensors")
    with pytest.raises(ScanError, match=r"version v2 .* does not fit campaign digits: classifier gives \(5,\) "
                                        r"outputs per image but the dataset has 10"):
        run_scan(scan_config, "2026-12-02")
    assert not (tmp_path / "scans/nightly/2026-12-02").exists()


def test_empty_or_unreadable_registries_are_refused(scan_config, tmp_path):
    (tmp_path / "registry" / "v2").mkdir()
    (tmp_path / "registry" / "v2" / "notes.txt").write_text("no checkpoint here")
    with pytest.raises(ModelError, match="registry/v2: no checkpoint"):
        run_scan(scan_config, "2026-12-02")
    shutil.rmtree(tmp_path / "registry")
    (tmp_path / "registry").mkdir()
    with pytest.raises(ModelError, match="holds no versions"):
        run_scan(scan_config, "2026-12-02")
    assert not (tmp_path / "scans").exists()


def test_a_second_trigger_of_a_running_scan_is_refused(scan_config, tmp_path):
    night = tmp_path / "scans/nightly/2026-12-02"
    night.mkdir(parents=True)
    from genstress_ray.storage import filesystem_for

    fs, path = filesystem_for(str(night))
    with RunLease(fs, path, str(night)):
        with pytest.raises(LeaseHeld):
            run_scan(scan_config, "2026-12-02")
    assert not (night / STARTED).exists()


def test_cli_names_a_future_date(scan_config, tmp_path):
    out = subprocess.run([sys.executable, "-m", "genstress_ray.cli", "scan", scan_config, "--date", "2999-01-01"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "--date 2999-01-01 is in the future" in out.stderr


@pytest.mark.slow
def test_two_strategies_run_side_by_side_in_one_scan(ray_cluster, scan_config, tiny_models, tmp_path):
    """Defuse on the VAE and latent code mixing on the style-based GAN, on the same version."""
    scan = yaml.safe_load((tmp_path / "scan.yaml").read_text())
    mixing = {**yaml.safe_load((tmp_path / "digits.yaml").read_text()), "campaign": "mixing",
              "generator": {"uri": tiny_models["style_generator"]},
              "strategy": {"name": "mixing", "seeds": 24, "budget_calls": 40, "tolerance": 0.01}}
    scan["campaigns"].append(mixing)
    (tmp_path / "scan.yaml").write_text(yaml.safe_dump(scan))
    result = run_scan(scan_config, "2026-12-01")
    rows = result.record["strategies"]
    assert list(rows) == ["digits", "mixing"]
    assert rows["digits"]["strategy"] == "defuse" and rows["mixing"]["strategy"] == "mixing"
    for name, row in rows.items():
        assert row["candidates"] > 0 and row["faults_per_call"] == pytest.approx(row["faults"] / row["candidates"])
        mine = [r for r in result.record["regions"] if r["campaign"] == name]
        assert row["new"] == len(mine) == row["failure_regions"]
        assert all(r["id"].startswith(f"{name}/2026-12-01/") for r in mine)
    # The style-based GAN has no encoder: its regions have no real members to score.
    assert all(r["history"][0]["real_subgroup_n"] == 0 for r in result.record["regions"] if r["campaign"] == "mixing")
    page = (tmp_path / "scans/nightly/2026-12-01" / REPORT).read_text()
    assert "<td>mixing</td>" in page and "<td>defuse</td>" in page


def test_registry_and_scans_on_object_storage(scan_config, models, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(models["v1"]), f"{s3_bucket}/registry/v1/model.safetensors")
    pinned = {"version": {"version": "v1", "uri": f"{s3_bucket}/registry/v1/model.safetensors"}}
    fs.pipe(f"{s3_bucket}/scans/nightly/2026-12-01/{STARTED}", json.dumps(pinned).encode())
    with pytest.raises(ScanError, match="scan of 2026-12-01 in s3://.* is incomplete"):
        run_scan(scan_config, "2026-12-02", output=f"{s3_bucket}/scans", registry=f"{s3_bucket}/registry")
    night = f"{s3_bucket}/scans/nightly/2026-12-01"
    with RunLease(fs, night.removeprefix("s3://"), night):  # another trigger is resuming that night
        with pytest.raises(LeaseHeld):
            run_scan(scan_config, "2026-12-01", output=f"{s3_bucket}/scans", registry=f"{s3_bucket}/registry")
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(night)) == [STARTED]


@pytest.mark.slow
def test_the_readmes_scan_commands_as_a_user_types_them(tmp_path):
    """The README's first two nightly-scan lines, as typed at the repository root (a fresh folder with
    the job files), with an empty model cache: a registry with v1, then the night's scan."""
    import os
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    block = readme.split("## Nightly scans", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("  #")[0].strip() for line in block.strip().splitlines()][:2]
    assert lines[0].startswith("genstress train classifier") and lines[1].startswith("genstress scan jobs/")
    work = tmp_path / "checkout"
    shutil.copytree(root / "jobs", work / "jobs")
    env = {**os.environ, "GENSTRESS_CACHE": str(tmp_path / "cache")}
    for line in lines:
        proc = subprocess.run(shlex.split(line), cwd=work, capture_output=True, text=True, env=env, timeout=1500)
        assert proc.returncode in (0, 3), proc.stderr[-3000:]
    out = proc.stdout
    assert proc.returncode == (3 if "ALERT" in out else 0)
    night = work / "genstress-scans" / "digits-nightly" / "2026-12-06"
    record = json.loads((night / RECORD).read_text())
    assert record["version"]["version"] == "v1" and record["strategies"]["demo"]["candidates"] > 0
    assert re.search(r"demo \(defuse\): \d+ candidates, \d+ faults, \d+ failure regions", out)
    assert f"report: {night}/index.html" in out and (night / REPORT).exists()
    assert (work / "genstress-scans" / "demo" / "digits-nightly-2026-12-06" / "manifest.json").exists()
