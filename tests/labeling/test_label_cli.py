"""`genstress label` on a real (tiny) run made by the Ray pipeline."""

import json

import pytest

from genstress_ray.cli import main
from genstress_ray.pipeline import run_campaign
from genstress_ray.storage import RunStore

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_oracle_then_label_studio_export_and_a_bad_file(tiny_config, tiny_models, tmp_path, capsys):
    result = run_campaign(tiny_config)
    assert result.counts["regions"] >= 1
    # The classifier under test as its own oracle agrees with itself: no failure regions.
    assert main(["label", result.run_uri, "--oracle", tiny_models["classifier"]]) == 0
    store = RunStore.from_uri(result.run_uri)
    labels = store.read_table("labels").to_pylist()
    assert len(labels) == result.counts["regions"] and not any(r["is_failure"] for r in labels)
    assert "0 failure regions" in capsys.readouterr().out
    tasks_path = tmp_path / "tasks.json"
    assert main(["label", result.run_uri, "--export-label-studio", str(tasks_path)]) == 0
    tasks = json.loads(tasks_path.read_text())
    assert len(tasks) == min(10, 4) * result.counts["regions"]  # 4 samples per region in tiny_config
    assert (tmp_path / "tasks.xml").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("region_id,label\n999,3\n")
    assert main(["label", result.run_uri, "--file", str(bad)]) == 2
    assert "unknown region_id 999" in capsys.readouterr().err
    assert store.read_table("labels").to_pylist() == labels  # untouched


def test_label_needs_a_run_uri(tmp_path, capsys):
    assert main(["label", str(tmp_path / "nope" / "c" / "r"), "--file", "x.csv"]) == 2
    assert "holds no run" in capsys.readouterr().err
