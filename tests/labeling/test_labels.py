import json
import re

import numpy as np
import pyarrow as pa
import pytest
import torch

from genstress_ray.labeling import (NOT_A_FAILURE, LabelError, labels_table, oracle_labels, read_label_file,
                                    read_labels, write_labels)
from genstress_ray.models import Classifier
from genstress_ray.regions import REGIONS_SCHEMA
from genstress_ray.data import png_bytes
from genstress_ray.storage import LABELS_SCHEMA, RunStore

CLASSES = ["dark", "bright"]


class Brightness(torch.nn.Module):
    """A reference that calls an image bright when its mean exceeds 0.5: the planted rule."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], 1) * 10


def _image(value: int) -> bytes:
    return png_bytes(np.full((1, 4, 4), value, np.uint8))


def _region_samples(spec):
    """spec: {region_id: [(pixel value, prediction of the classifier under test), ...]}"""
    rows = []
    for rid, samples in spec.items():
        for draw, (value, pred) in enumerate(samples):
            rows.append({"region_id": rid, "draw": draw, "image": _image(value), "pred": pred})
    return pa.Table.from_pylist(rows)


def test_oracle_follows_the_planted_rule_with_rho_and_review_budget():
    table = _region_samples({
        0: [(20, 1)] * 10,                                  # dark images predicted bright: a failure region
        1: [(230, 1)] * 10,                                 # bright predicted bright: fine
        2: [(20, 1)] * 4 + [(230, 1)] * 6 + [(20, 1)] * 5,  # 40% of the first 10 disagree
    })
    reference = Classifier(Brightness(), CLASSES, (1, 4, 4))
    labels = {r["region_id"]: r for r in oracle_labels(table, reference, rho=0.5, per_region=10).to_pylist()}
    assert labels[0]["is_failure"] and labels[0]["label"] == "dark" and labels[0]["agreement"] == 1.0
    assert not labels[1]["is_failure"] and labels[1]["label"] == NOT_A_FAILURE
    assert not labels[2]["is_failure"]  # 0.4 <= rho: the 5 extra dark samples are beyond the review budget
    stricter = {r["region_id"]: r for r in oracle_labels(table, reference, rho=0.3).to_pylist()}
    assert stricter[2]["is_failure"] and stricter[2]["label"] == "bright"
    assert all(r["source"] == "oracle" for r in stricter.values())


@pytest.fixture
def run_with_regions(tmp_path):
    store = RunStore(str(tmp_path), "c", "r")
    store.begin_stage("regions")
    rows = [{"region_id": i, "weight": 0.5, "mean": [0.0], "cov": [1.0], "n_members": 3, "dominant_source_label": 0,
             "dominant_source_share": 1.0, "dominant_pred": 1, "dominant_pred_share": 1.0} for i in (0, 1)]
    store.write_table("regions", pa.Table.from_pylist(rows, schema=REGIONS_SCHEMA))
    store.complete_stage("regions", {"regions": 2})
    return store


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_label_file_round_trip(run_with_regions, tmp_path, fmt):
    path = tmp_path / f"labels.{fmt}"
    if fmt == "csv":
        path.write_text("region_id,label\n0,dark\n1,not a failure\n")
    else:
        path.write_text(json.dumps([{"region_id": 0, "label": "dark"}, {"region_id": 1, "label": "not a failure"}]))
    write_labels(run_with_regions, read_label_file(str(path)), CLASSES)
    labels = read_labels(run_with_regions).to_pylist()
    assert [(r["region_id"], r["label"], r["is_failure"], r["source"]) for r in labels] == \
        [(0, "dark", True, "file"), (1, NOT_A_FAILURE, False, "file")]
    assert run_with_regions.marker("labels")["failure_regions"] == 1


def test_bad_label_files_are_reported_whole_and_write_nothing(run_with_regions, tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("region_id,label\n0,dark\n")
    write_labels(run_with_regions, read_label_file(str(good)), CLASSES)
    before = read_labels(run_with_regions)
    bad = tmp_path / "bad.csv"
    bad.write_text("region_id,label\n0,dark\n0,bright\n7,dark\n1,cat\n")
    with pytest.raises(LabelError) as err:
        write_labels(run_with_regions, read_label_file(str(bad)), CLASSES)
    message = str(err.value)
    assert "duplicate label for region 0" in message and "unknown region_id 7" in message
    assert "label 'cat' is not a class" in message and "nothing written" in message
    assert read_labels(run_with_regions).equals(before)


def test_labels_for_a_run_without_regions_are_refused(tmp_path):
    store = RunStore(str(tmp_path), "c", "empty")
    store.begin_stage("regions")
    store.write_table("regions", REGIONS_SCHEMA.empty_table())
    store.complete_stage("regions", {"regions": 0})
    path = tmp_path / "l.csv"
    path.write_text("region_id,label\n0,dark\n")
    with pytest.raises(LabelError, match="has no regions to label"):
        write_labels(store, read_label_file(str(path)), CLASSES)
    assert not store.is_complete("labels")


def test_unreadable_or_malformed_label_files_name_the_file(tmp_path):
    with pytest.raises(LabelError, match="missing.csv"):
        read_label_file(str(tmp_path / "missing.csv"))
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(LabelError, match="x.json.*not valid JSON"):
        read_label_file(str(tmp_path / "x.json"))
    (tmp_path / "y.csv").write_text("region,class\n0,dark\n")
    with pytest.raises(LabelError, match="needs 'region_id' and 'label'"):
        read_label_file(str(tmp_path / "y.csv"))


def test_label_studio_round_trip_takes_the_majority_and_records_agreement(run_with_regions, tmp_path):
    from genstress_ray.labeling import export_tasks, import_export, labeling_config

    samples = _region_samples({0: [(20, 1)] * 3, 1: [(230, 1)] * 2})
    samples = samples.append_column("sample_id", pa.array([f"s{i}" for i in range(samples.num_rows)]))
    tasks = export_tasks(samples, CLASSES, run_with_regions.uri, per_region=10)
    assert len(tasks) == 5 and tasks[0]["data"]["image"].startswith("data:image/png;base64,")
    assert '<Choice value="not a failure"/>' in labeling_config(CLASSES)
    votes = {0: ["dark", "dark", "bright"], 1: ["not a failure", "not a failure"]}
    for task in tasks:  # what Label Studio's JSON export adds: one annotation per annotator
        rid = task["data"]["region_id"]
        choice = votes[rid].pop()
        task["annotations"] = [{"completed_by": 7, "result": [{"from_name": "label", "to_name": "image",
                                                               "type": "choices", "value": {"choices": [choice]}}]}]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    table = import_export(str(export), run_with_regions.uri)
    write_labels(run_with_regions, table, CLASSES)
    rows = {r["region_id"]: r for r in read_labels(run_with_regions).to_pylist()}
    assert rows[0]["label"] == "dark" and rows[0]["is_failure"] and abs(rows[0]["agreement"] - 2 / 3) < 1e-9
    assert rows[1]["label"] == NOT_A_FAILURE and not rows[1]["is_failure"] and rows[1]["agreement"] == 1.0
    assert rows[0]["source"] == "label_studio" and rows[0]["annotator"] == "7"


def test_a_label_studio_export_from_another_project_is_refused(run_with_regions, tmp_path):
    from genstress_ray.labeling import import_export

    export = tmp_path / "other.json"
    export.write_text(json.dumps([{"data": {"region_id": 0, "genstress_run": "s3://other/c/r"}, "annotations": []}]))
    with pytest.raises(LabelError, match="from another project or run.*nothing imported"):
        import_export(str(export), run_with_regions.uri)
    assert not run_with_regions.is_complete("labels")


@pytest.mark.parametrize("export, message", [
    (["a", "b"], "task 1: a task must be an object with a 'data' object, got str"),
    ([{"data": {"genstress_run": "x"}, "annotations": []}], "task 1: data.region_id is missing"),
    ([{"data": {"region_id": "one"}, "annotations": []}], "task 1: data.region_id 'one' is not a whole number"),
    ([{"data": {"region_id": 1.5}, "annotations": []}], "task 1: data.region_id 1.5 is not a whole number"),
    ([{"data": {"region_id": 0}, "annotations": "yes"}], "task 1: 'annotations' must be a list"),
])
def test_malformed_label_studio_exports_are_named_not_tracebacks(run_with_regions, tmp_path, export, message):
    from genstress_ray.labeling import import_export

    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    with pytest.raises(LabelError, match=f"export.json', {re.escape(message)}.*nothing imported"):
        import_export(str(path), run_with_regions.uri)
    assert not run_with_regions.is_complete("labels")


def test_labels_changed_in_the_run_folder_are_refused_when_read(run_with_regions, tmp_path):
    """A labels table rewritten with a label outside the classes, or a failure without a label, went
    into correction unchecked."""
    run_with_regions.write_manifest({"class_names": CLASSES})
    write_labels(run_with_regions, labels_table([{"region_id": 0, "label": "dark", "is_failure": True,
                                                  "source": "human"}]), CLASSES)
    assert read_labels(run_with_regions).num_rows == 1
    rows = [{**r, "label": "99"} for r in run_with_regions.read_table("labels").to_pylist()]
    rows.append({**rows[0], "region_id": 1, "label": None})
    run_with_regions.write_table("labels", pa.Table.from_pylist(rows, schema=LABELS_SCHEMA))
    with pytest.raises(LabelError, match=r"labels of run .* were changed since they were written; relabel the run:"
                                         r"\n  row 1: label '99' is not a class.*\n  row 2: a failure needs a label"):
        read_labels(run_with_regions)
