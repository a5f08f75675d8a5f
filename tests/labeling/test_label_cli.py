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
    regions = [r for r in labels if r["region_id"] is not None]
    faults = [r for r in labels if r["sample_id"] is not None]
    assert len(regions) == result.counts["regions"] and not any(r["is_failure"] for r in labels)
    # Every kept fault labelled one by one (fewer than --fault-labels), for the correction baseline.
    assert len(faults) == store.count_rows("identify") and len(labels) == len(regions) + len(faults)
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
    # A file with one region's label would remove every other label: refused unless --replace.
    one = tmp_path / "one.csv"
    one.write_text("region_id,label\n0,3\n")
    assert main(["label", result.run_uri, "--file", str(one)]) == 2
    err = capsys.readouterr().err
    assert f"would remove {len(labels) - 1} of the run's labels (region 1" in err and "--replace" in err
    assert store.read_table("labels").to_pylist() == labels
    # An import that labels nothing (a Label Studio export without annotations) writes nothing.
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert main(["label", result.run_uri, "--import-label-studio", str(empty)]) == 2
    assert "no labels came from import label studio" in capsys.readouterr().err
    for option, value, why in (("--per-region", "0", "'0' is not a whole number of at least 1"),
                               ("--rho", "2", "'2' is not a number from 0 to 1")):
        with pytest.raises(SystemExit) as stopped:  # argparse's usage error
            main(["label", result.run_uri, "--oracle", tiny_models["classifier"], option, value])
        assert stopped.value.code == 2 and why in capsys.readouterr().err
    assert store.read_table("labels").to_pylist() == labels
    assert main(["label", result.run_uri, "--file", str(one), "--replace"]) == 0
    assert [r["region_id"] for r in store.read_table("labels").to_pylist()] == [0]


def test_label_needs_a_run_uri(tmp_path, capsys):
    assert main(["label", str(tmp_path / "nope" / "c" / "r"), "--file", "x.csv"]) == 2
    assert "holds no run" in capsys.readouterr().err


def test_oracle_from_the_config_and_a_config_without_one(tiny_config, tiny_models, capsys):
    result = run_campaign(tiny_config)
    assert main(["label", result.run_uri, "--oracle"]) == 2
    assert "no 'oracle' section" in capsys.readouterr().err
    tiny_config["run_id"] = "with-oracle"
    tiny_config["oracle"] = {"uri": tiny_models["classifier"]}
    result = run_campaign(tiny_config)
    assert main(["label", result.run_uri, "--oracle", "--fault-labels", "2"]) == 0
    labels = RunStore.from_uri(result.run_uri).read_table("labels").to_pylist()
    assert sum(r["sample_id"] is not None for r in labels) == 2
    assert sum(r["region_id"] is not None for r in labels) == result.counts["regions"]
