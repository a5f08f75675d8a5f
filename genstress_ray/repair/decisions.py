"""Decisions on relabelling proposals (the ``relabels`` table) and applying the accepted ones to D.

Four ways decide, as for region labels: an oracle (a reference classifier: accepted when it disagrees
with the dataset label), a file (the proposals CSV with its ``accept`` column filled in), a Label
Studio export of the proposals' tasks, and the review page. The first three are ``DECIDERS`` plugins of
``genstress repair``; the review page saves one decision per click (``labeling.review``).
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from genstress_ray.context import RunContext
from genstress_ray.data import ImageSet, decode_images
from genstress_ray.labeling import LabelError
from genstress_ray.labeling.files import truthy
from genstress_ray.labeling.label_studio import annotation_choice
from genstress_ray.labeling.methods import CONFIG_ORACLE, Labeller
from genstress_ray.labeling.table import SOURCES
from genstress_ray.lease import holding
from genstress_ray.models import ModelRef
from genstress_ray.models.training import images_predictions
from genstress_ray.registry import Registry
from genstress_ray.repair.proposals import KEEP, RepairError, read_proposals
from genstress_ray.storage import RELABELS_SCHEMA, RunStore, StorageError, read_bytes

STAGE = "relabels"


def relabels_table(rows: list[dict]) -> pa.Table:
    """Rows (``sample_id``, ``label``, ``accepted``, ``source``, ``annotator``) as a ``relabels`` table."""
    now = time.time()
    return pa.Table.from_pylist([{**{n: None for n in RELABELS_SCHEMA.names}, "time": now, **r} for r in rows],
                                schema=RELABELS_SCHEMA)


def validate_relabels(table: pa.Table, proposals: pa.Table, class_names: list[str]) -> None:
    """Refuse decisions on rows that were not proposed, labels outside the classes, duplicates, unknown sources."""
    proposed = dict(zip(proposals["sample_id"].to_pylist(), proposals["dataset_label"].to_pylist()))
    problems, seen = [], set()
    for i, row in enumerate(table.to_pylist()):
        where, sid = f"row {i + 1}", row["sample_id"]
        if sid not in proposed:
            problems.append(f"{where}: {sid!r} is not a proposed row of this run")
        if row["accepted"] and row["label"] not in class_names:
            problems.append(f"{where}: label {row['label']!r} is not a class (allowed: {', '.join(class_names)})")
        if row["source"] not in SOURCES:
            problems.append(f"{where}: source {row['source']!r} is not one of {', '.join(SOURCES)}")
        if sid in seen:
            problems.append(f"{where}: a second decision for {sid!r}")
        seen.add(sid)
    if problems:
        raise RepairError("relabels rejected, nothing written:\n  " + "\n  ".join(problems))


def write_relabels(store: RunStore, table: pa.Table, class_names: list[str]) -> None:
    """Validate against the run's proposals, then replace the ``relabels`` table in one atomic step."""
    validate_relabels(table, read_proposals(store), class_names)
    with holding(store):
        _write(store, table)


def update_relabels(store: RunStore, change, class_names: list[str], wait: float = 3.0) -> None:
    """Apply ``change`` (the run's decision rows -> the new rows) under the run's lease, reading the
    decisions again there (see ``labeling.update_labels``)."""
    with holding(store, wait):
        current = store.read_table(STAGE).to_pylist() if store.is_complete(STAGE) else []
        table = relabels_table(change(current))
        validate_relabels(table, read_proposals(store), class_names)
        _write(store, table)


def _write(store: RunStore, table: pa.Table) -> None:
    store.fs.makedirs(store.stage_path(STAGE), exist_ok=True)
    store.write_table(STAGE, table)
    store.complete_stage(STAGE, {"decisions": table.num_rows,
                                 "accepted": sum(bool(a) for a in table["accepted"].to_pylist()),
                                 "sources": sorted(set(table["source"].to_pylist()))})


def read_relabels(store: RunStore) -> pa.Table:
    if not store.is_complete(STAGE):
        raise RepairError(f"run {store.uri} has no relabelling decisions: make them with genstress repair RUN "
                          "--oracle, --file or --import-label-studio, or on the review page (genstress label RUN)")
    return store.read_table(STAGE)


def apply_relabels(split: ImageSet, relabels: pa.Table) -> tuple[np.ndarray, list[dict]]:
    """``split``'s labels with the accepted relabels applied, and one ``{sample_id, from, to}`` per change.

    A relabel of a row the split does not hold (proposals made on other training data) is an error.
    """
    names = split.class_names
    position = {sid: i for i, sid in enumerate(split.source_ids)}
    labels, changes = split.labels.copy(), []
    for r in relabels.to_pylist():
        if not r["accepted"]:
            continue
        if r["sample_id"] not in position:
            raise RepairError(f"relabel of {r['sample_id']!r}: the training split holds no such row "
                              "(were the proposals made on other training data?)")
        i, new = position[r["sample_id"]], names.index(r["label"])
        if labels[i] != new:
            changes.append({"sample_id": r["sample_id"], "from": names[labels[i]], "to": r["label"]})
            labels[i] = new
    return labels, changes


def _oracle(store: RunStore, value: str, options: dict[str, Any]) -> pa.Table:
    """The reference's label for each proposed image: accepted where it differs from the dataset's."""
    ctx = RunContext.open(store.uri, options.get("config"), store.storage_options)
    reference = ctx.oracle() if value == CONFIG_ORACLE else ctx.classifier(ModelRef(value))
    proposals = read_proposals(store)
    ids = proposals["sample_id"].to_pylist()
    if not ids:
        return relabels_table([])
    images = decode_images(proposals["image"].to_pylist(), ids, None)
    truth = images_predictions(reference, images)
    return relabels_table([{"sample_id": sid, "label": reference.class_names[t], "source": "oracle",
                            "accepted": reference.class_names[t] != dataset, "annotator": "oracle"}
                           for sid, t, dataset in zip(ids, truth.tolist(), proposals["dataset_label"].to_pylist())])


def _records(uri: str) -> list[dict]:
    try:
        text = read_bytes(uri).decode("utf-8")
        records = json.loads(text) if uri.endswith(".json") else list(csv.DictReader(io.StringIO(text)))
    except (StorageError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RepairError(f"cannot read decisions file {uri!r}: {exc}") from exc
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise RepairError(f"decisions file {uri!r} must hold a list of rows with sample_id and accept")
    return records


def _file(store: RunStore, value: str, options: dict[str, Any]) -> pa.Table:
    """Rows ``sample_id, accept[, label]`` (the proposals CSV, filled in); rows left blank are undecided.
    ``label`` defaults to the proposed label."""
    proposed = dict(zip(*(read_proposals(store)[c].to_pylist() for c in ("sample_id", "proposed_label"))))
    rows = []
    for i, rec in enumerate(_records(value)):
        if "sample_id" not in rec or "accept" not in rec:
            raise RepairError(f"decisions file {value!r} row {i + 1}: needs 'sample_id' and 'accept' (has {sorted(rec)})")
        try:
            accept = truthy(rec["accept"], "accept")
        except LabelError as exc:
            raise RepairError(f"decisions file {value!r} row {i + 1}: {exc}") from None
        if accept is None:
            continue
        label = str(rec.get("label") or proposed.get(rec["sample_id"], "")).strip()
        rows.append({"sample_id": rec["sample_id"], "label": label, "accepted": accept, "source": "file",
                     "annotator": str(rec.get("annotator") or "file")})
    return relabels_table(rows)


def _label_studio(store: RunStore, value: str, options: dict[str, Any]) -> pa.Table:
    """The majority choice per task of a Label Studio export of ``label_studio_tasks``; ``KEEP`` rejects."""
    records = _records(value)
    rows = []
    for i, task in enumerate(records):
        data = task.get("data")
        if not isinstance(data, dict) or "sample_id" not in data:
            raise RepairError(f"{value!r}, task {i + 1}: data.sample_id is missing (not a task of "
                              "repair/label_studio_tasks.json); nothing imported")
        if data.get("genstress_run") != store.uri:
            raise RepairError(f"{value!r}, task {i + 1}: made for {data.get('genstress_run')!r}, not {store.uri}; "
                              "nothing imported")
        votes = Counter(c for c in (annotation_choice(a) for a in task.get("annotations", []) if isinstance(a, dict)
                                    and not a.get("was_cancelled")) if c is not None)
        if votes:
            label = votes.most_common(1)[0][0]
            rows.append({"sample_id": data["sample_id"], "label": None if label == KEEP else label,
                         "accepted": label != KEEP, "source": "label_studio", "annotator": "label_studio"})
    return relabels_table(rows)


DECIDERS: Registry[Labeller] = Registry("relabelling method", RepairError)
for _decider in (
    Labeller("oracle", "a reference classifier decides each proposal (no CHECKPOINT: the config's oracle)",
             "CHECKPOINT", _oracle, default=CONFIG_ORACLE),
    Labeller("file", "import decisions: the proposals CSV with its accept column filled in (yes/no)", "FILE", _file),
    Labeller("import_label_studio", "import Label Studio's JSON export of repair/label_studio_tasks.json",
             "EXPORT_JSON", _label_studio),
):
    DECIDERS.register(_decider.name, _decider)
