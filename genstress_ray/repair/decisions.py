"""Decisions on relabelling proposals (the ``relabels`` table) and applying the accepted ones to D.

Four ways decide, as for region labels: an oracle (a reference classifier: accepted when it disagrees
with the dataset label), a file (the proposals CSV with its ``accept`` column filled in), a Label
Studio export of the proposals' tasks, and the review page. The first three are ``DECIDERS`` plugins of
``genstress repair``; the review page saves one decision per click (``labeling.review``).
"""

from __future__ import annotations

import csv
import io
import itertools
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
from genstress_ray.repair.proposals import KEEP, RepairError, check_current, ranked, read_proposals
from genstress_ray.storage import RELABELS_SCHEMA, RunStore, StorageError, read_bytes

STAGE = "relabels"


def relabels_table(rows: list[dict]) -> pa.Table:
    """Rows (``sample_id``, ``label``, ``accepted``, ``source``, ``annotator``) as a ``relabels`` table."""
    now = time.time()
    return pa.Table.from_pylist([{**{n: None for n in RELABELS_SCHEMA.names}, "time": now, **r} for r in rows],
                                schema=RELABELS_SCHEMA)


def validate_relabels(table: pa.Table, proposals: pa.Table, class_names: list[str],
                      kept: frozenset[str] = frozenset()) -> None:
    """Refuse decisions on rows that were not proposed, labels outside the classes, duplicates, unknown
    sources. ``kept``: images whose earlier decision is carried over unchanged, which may have been
    proposed by proposals made before the current ones (``--again``)."""
    proposed = set(proposals["sample_id"].to_pylist())
    problems, seen = [], set()
    for i, row in enumerate(table.to_pylist()):
        where, sid = f"row {i + 1}", row["sample_id"]
        if sid not in proposed and sid not in kept:
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
    check_current(store, class_names)
    with holding(store):
        _write(store, table)


def merged(current: list[dict], new: list[dict]) -> list[dict]:
    """The run's decisions with ``new`` ones added: each image takes its new decision; every earlier
    decision on another image is kept. A region's decision that contradicts an earlier decision made on
    one of its images by itself is refused, unless the new decisions hold that image's own row."""
    mine = {r["sample_id"]: r for r in new}
    clashes = [f"{sid}: decided {'accept' if old['accepted'] else 'keep'} on its own before, its region now "
               f"says {'accept' if mine[sid]['accepted'] else 'keep'}"
               for old in current if (sid := old["sample_id"]) in mine and mine[sid].get("by_region")
               and not old.get("by_region") and bool(old["accepted"]) != bool(mine[sid]["accepted"])]
    if clashes:
        raise RepairError(f"{len(clashes)} region decision(s) contradict earlier per-image decisions; nothing "
                          "written (add a row for each such image to the decisions, as an exception):\n  "
                          + "\n  ".join(clashes[:20]))
    return [r for r in current if r["sample_id"] not in mine] + list(mine.values())


def add_relabels(store: RunStore, table: pa.Table, class_names: list[str]) -> None:
    """Add decisions to the run's (``merged``), under the run's lease: no earlier decision is lost."""
    update_relabels(store, lambda current: merged(current, table.to_pylist()), class_names)


def update_relabels(store: RunStore, change, class_names: list[str], wait: float = 3.0) -> None:
    """Apply ``change`` (the run's decision rows -> the new rows) under the run's lease, reading the
    decisions again there (see ``labeling.update_labels``)."""
    with holding(store, wait):
        current = store.read_table(STAGE).to_pylist() if store.is_complete(STAGE) else []
        table = relabels_table(change(current))
        # After the proposals were made again (--again), earlier decisions on images no longer proposed
        # are kept as they were.
        kept = frozenset(r["sample_id"] for r in table.to_pylist() if r in current)
        validate_relabels(table, read_proposals(store), class_names, kept)
        check_current(store, class_names)
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
    """The reference's label for each proposed image: accepted where it differs from the dataset's.

    With ``options["grid"]`` (N > 0) it decides as a person reviewing by region would: each region as a
    whole, accepted when the reference agrees with the proposed label on most of the region's N most
    likely proposals (the grid a reviewer looks at), then ``options["exceptions"]`` images one by one,
    the least likely proposals of accepted regions first (where a region's decision is most often wrong).
    """
    ctx = RunContext.open(store.uri, options.get("config"), store.storage_options)
    reference = ctx.oracle() if value == CONFIG_ORACLE else ctx.classifier(ModelRef(value))
    proposals = ranked(read_proposals(store))
    if not proposals:
        return relabels_table([])

    def verdicts(rows: list[dict]) -> list[str]:
        ids = [r["sample_id"] for r in rows]
        images = decode_images([r["image"] for r in rows], ids, None)
        return [reference.class_names[t] for t in images_predictions(reference, images).tolist()]

    def one(r: dict, label: str, by_region: bool) -> dict:
        return {"sample_id": r["sample_id"], "label": label, "source": "oracle", "annotator": "oracle",
                "accepted": label != r["dataset_label"], "by_region": by_region}

    grid, budget = int(options.get("grid") or 0), int(options.get("exceptions") or 0)
    if not grid:
        return relabels_table([one(r, t, False) for r, t in zip(proposals, verdicts(proposals))])
    decided = {}
    for _, rows in itertools.groupby(proposals, key=lambda r: r["region_id"]):
        rows = list(rows)
        shown = rows[:grid]
        agree = sum(t == r["proposed_label"] for r, t in zip(shown, verdicts(shown)))
        accept = agree * 2 > len(shown)
        decided.update({r["sample_id"]: {**one(r, r["proposed_label"], True), "accepted": accept} for r in rows})
    doubtful = sorted((r for r in proposals if decided[r["sample_id"]]["accepted"]),
                      key=lambda r: r["score"] or 0.0)[:budget]
    if doubtful:
        decided.update({r["sample_id"]: one(r, t, False) for r, t in zip(doubtful, verdicts(doubtful))})
    return relabels_table(list(decided.values()))


def _records(uri: str) -> list[dict]:
    try:
        text = read_bytes(uri).decode("utf-8")
        records = json.loads(text) if uri.endswith(".json") else list(csv.DictReader(io.StringIO(text)))
    except (StorageError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RepairError(f"cannot read decisions file {uri!r}: {exc}") from exc
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise RepairError(f"decisions file {uri!r} must hold a list of rows with sample_id and accept")
    return records


def _by_region(store: RunStore) -> tuple[dict[str, str], dict[int, list[str]]]:
    """The run's proposals: sample id -> proposed label, and region -> its sample ids."""
    proposals = read_proposals(store).select(["sample_id", "region_id", "proposed_label"]).to_pylist()
    regions: dict[int, list[str]] = {}
    for r in proposals:
        regions.setdefault(r["region_id"], []).append(r["sample_id"])
    return {r["sample_id"]: r["proposed_label"] for r in proposals}, regions


def _expanded(images: dict[str, dict], whole: dict[int, dict], proposed: dict[str, str],
              regions: dict[int, list[str]], source: str) -> pa.Table:
    """Per-image decisions plus every region decided whole, expanded to its proposals that have no
    decision of their own (the exceptions)."""
    rows = [{"sample_id": sid, "label": d["label"] or proposed[sid], "accepted": d["accepted"], "source": source,
             "annotator": d["annotator"], "by_region": True}
            for region, d in whole.items() for sid in regions[region] if sid not in images]
    return relabels_table(rows + [{**d, "source": source, "by_region": False} for d in images.values()])


def _file(store: RunStore, value: str, options: dict[str, Any]) -> pa.Table:
    """Rows ``sample_id, accept[, label]`` (the proposals CSV, filled in); rows left blank are undecided.
    ``label`` defaults to the proposed label. A row with a ``region_id`` and no ``sample_id`` decides every
    proposal of that region; an image's own row is an exception to it."""
    proposed, regions = _by_region(store)
    images, whole = {}, {}
    for i, rec in enumerate(_records(value)):
        where = f"decisions file {value!r} row {i + 1}"
        if "sample_id" not in rec or "accept" not in rec:
            raise RepairError(f"{where}: needs 'sample_id' and 'accept' (has {sorted(rec)})")
        try:
            accept = truthy(rec["accept"], "accept")
        except LabelError as exc:
            raise RepairError(f"{where}: {exc}") from None
        if accept is None:
            continue
        annotator = str(rec.get("annotator") or "file")
        label = str(rec.get("label") or "").strip() or None
        sid = str(rec["sample_id"] or "").strip()
        if not sid:
            region = _region_of(rec, where, regions)
            if region in whole:
                raise RepairError(f"{where}: a second decision for region {region}")
            whole[region] = {"accepted": accept, "annotator": annotator, "label": label}
            continue
        images[sid] = {"sample_id": sid, "label": label or proposed.get(sid, ""), "accepted": accept,
                       "annotator": annotator}
    return _expanded(images, whole, proposed, regions, "file")


def _region_of(rec: dict, where: str, regions: dict[int, list[str]]) -> int:
    try:
        region = int(str(rec.get("region_id", "")).strip())
    except ValueError:
        raise RepairError(f"{where}: a row without a sample_id decides a region and needs its region_id "
                          f"(has {rec.get('region_id')!r})") from None
    if region not in regions:
        raise RepairError(f"{where}: region {region} has no proposals (regions with proposals: "
                          f"{', '.join(map(str, sorted(regions))) or 'none'})")
    return region


def _label_studio(store: RunStore, value: str, options: dict[str, Any]) -> pa.Table:
    """The majority choice per task of a Label Studio export of ``label_studio_tasks``; ``KEEP`` rejects.
    A region's task (no ``sample_id``) decides its proposals whole; an image's task is an exception."""
    proposed, regions = _by_region(store)
    images, whole = {}, {}
    for i, task in enumerate(_records(value)):
        data = task.get("data")
        where = f"{value!r}, task {i + 1}"
        if not isinstance(data, dict) or "sample_id" not in data:
            raise RepairError(f"{where}: data.sample_id is missing (not a task of "
                              "repair/label_studio_tasks.json); nothing imported")
        if data.get("genstress_run") != store.uri:
            raise RepairError(f"{where}: made for {data.get('genstress_run')!r}, not {store.uri}; nothing imported")
        votes = Counter(c for c in (annotation_choice(a) for a in task.get("annotations", []) if isinstance(a, dict)
                                    and not a.get("was_cancelled")) if c is not None)
        if not votes:
            continue
        label = votes.most_common(1)[0][0]
        decision = {"label": None if label == KEEP else label, "accepted": label != KEEP, "annotator": "label_studio"}
        if data["sample_id"]:
            images[data["sample_id"]] = {"sample_id": data["sample_id"], **decision}
        else:
            whole[_region_of(data, where, regions)] = decision
    return _expanded(images, whole, proposed, regions, "label_studio")


DECIDERS: Registry[Labeller] = Registry("relabelling method", RepairError)
for _decider in (
    Labeller("oracle", "a reference classifier decides each proposal (no CHECKPOINT: the config's oracle)",
             "CHECKPOINT", _oracle, default=CONFIG_ORACLE),
    Labeller("file", "import decisions: the proposals CSV with its accept column filled in (yes/no)", "FILE", _file),
    Labeller("import_label_studio", "import Label Studio's JSON export of repair/label_studio_tasks.json",
             "EXPORT_JSON", _label_studio),
):
    DECIDERS.register(_decider.name, _decider)
