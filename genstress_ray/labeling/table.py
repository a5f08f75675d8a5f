"""The ``labels`` table of a run: one row per labelled region (or sample), written atomically.

Every way of labelling (oracle, file, Label Studio, review page) produces these same columns, so
correction and the report read one table whatever the labels came from.
"""

from __future__ import annotations

import time

import pyarrow as pa

from genstress_ray.labeling.support import with_flags
from genstress_ray.lease import holding
from genstress_ray.storage import LABELS_SCHEMA, RunStore

STAGE = "labels"
NOT_A_FAILURE = "not a failure"
SOURCES = ("oracle", "file", "label_studio", "human")


class LabelError(ValueError):
    """Labels that cannot be accepted. Nothing is written when this is raised."""


def region_ids(store: RunStore) -> list[int]:
    """The run's region ids; a run without finished regions cannot be labelled."""
    if not store.is_complete("regions"):
        raise LabelError(f"run {store.uri} has no finished regions stage: run the campaign first")
    ids = store.read_table("regions", columns=["region_id"])["region_id"].to_pylist()
    if not ids:
        raise LabelError(f"run {store.uri} has no regions to label (its regions table is empty)")
    return ids


def labels_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with any subset of the columns) as a ``labels`` table; missing values are null."""
    now = time.time()
    filled = [{**{name: None for name in LABELS_SCHEMA.names}, "time": now, **row} for row in rows]
    return pa.Table.from_pylist(filled, schema=LABELS_SCHEMA)


def validate_labels(table: pa.Table, known_regions: list[int], class_names: list[str] | None,
                    refused: str = "labels rejected, nothing written") -> None:
    """Refuse unknown region ids, labels outside the class list (unchecked when ``class_names`` is
    None), failures without a label, duplicates and unknown sources (a LabelError that starts with
    ``refused`` and lists every problem)."""
    problems = []
    known = set(known_regions)
    allowed = None if class_names is None else set(class_names) | {NOT_A_FAILURE}
    seen = set()
    for i, row in enumerate(table.to_pylist()):
        where = f"row {i + 1}"
        rid = row["region_id"]
        if rid is None and row["sample_id"] is None:
            problems.append(f"{where}: needs a region_id or a sample_id")
        if rid is not None and rid not in known:
            problems.append(f"{where}: unknown region_id {rid} (the run has {sorted(known)})")
        if allowed is not None and row["label"] is not None and row["label"] not in allowed:
            problems.append(f"{where}: label {row['label']!r} is not a class (allowed: {', '.join(class_names)}, "
                            f"{NOT_A_FAILURE!r})")
        if row["is_failure"] and row["label"] is None:
            problems.append(f"{where}: a failure needs a label")
        if row["source"] not in SOURCES:
            problems.append(f"{where}: source {row['source']!r} is not one of {', '.join(SOURCES)}")
        key = (rid, row["sample_id"])
        if key in seen:
            problems.append(f"{where}: duplicate label for {'region ' + str(rid) if rid is not None else row['sample_id']}")
        seen.add(key)
    if problems:
        raise LabelError(f"{refused}:\n  " + "\n  ".join(problems))


def write_labels(store: RunStore, table: pa.Table, class_names: list[str]) -> None:
    """Validate, flag the failure labels their regions do not support (``labeling.support``), then
    replace the run's ``labels`` table in one atomic step: earlier labels stay readable until the new
    file is in place, and bad labels touch nothing."""
    validate_labels(table, region_ids(store), class_names)
    with holding(store):  # one writer per run: not while a campaign or correction writes it
        _write(store, table, class_names)


def update_labels(store: RunStore, change, class_names: list[str], wait: float = 3.0) -> None:
    """Apply ``change`` (the run's label rows -> the new rows) under the run's lease, reading the
    labels again there: two review pages on one run never overwrite each other's answers. Waits up to
    ``wait`` seconds for another short writer; ``LeaseHeld`` when a campaign holds the run."""
    with holding(store, wait):
        current = store.read_table(STAGE).to_pylist() if store.is_complete(STAGE) else []
        table = labels_table(change(current))
        validate_labels(table, region_ids(store), class_names)
        _write(store, table, class_names)


def _write(store: RunStore, table: pa.Table, class_names: list[str]) -> None:
    """Flag and write a validated labels table (the caller holds the run's lease)."""
    table = with_flags(labels_table(table.to_pylist()), store, class_names)
    rows = table.to_pylist()
    regions = [r for r in rows if r["region_id"] is not None]
    store.fs.makedirs(store.stage_path(STAGE), exist_ok=True)
    store.write_table(STAGE, table)
    store.complete_stage(STAGE, {"labels": table.num_rows, "regions": len(regions),
                                 "sources": sorted({r["source"] for r in rows}),
                                 "failure_regions": sum(bool(r["is_failure"]) for r in regions),
                                 "flagged": {str(r["region_id"]): r["flag"] for r in regions if r["flag"]}})


def removed_decisions(store: RunStore, table: pa.Table) -> list[str]:
    """The run's current labels (regions, or faults by sample id) that writing ``table`` would remove."""
    if not store.is_complete(STAGE):
        return []
    key = (lambda r: f"region {r['region_id']}" if r["region_id"] is not None else f"fault {r['sample_id']}")
    kept = {key(r) for r in table.select(["region_id", "sample_id"]).to_pylist()}
    return [k for r in store.read_table(STAGE, columns=["region_id", "sample_id"]).to_pylist()
            if (k := key(r)) not in kept]


def read_labels(store: RunStore) -> pa.Table:
    """The run's labels, checked as when they were written: the table is as writable as the bucket."""
    if not store.is_complete(STAGE):
        raise LabelError(f"run {store.uri} has no labels yet")
    table = store.read_table(STAGE)
    validate_labels(table, region_ids(store), store.read_manifest().get("class_names"),
                    f"the labels of run {store.uri} were changed since they were written; relabel the run")
    return table
