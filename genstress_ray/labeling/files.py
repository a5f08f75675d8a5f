"""Import region labels from a CSV or JSON file a person filled in."""

from __future__ import annotations

import csv
import io
import json

import pyarrow as pa

from genstress_ray.labeling.table import NOT_A_FAILURE, LabelError, labels_table
from genstress_ray.storage import StorageError, read_bytes


def truthy(value, field: str = "is_failure") -> bool | None:
    """A yes/no cell: True, False, or None when blank; a LabelError otherwise."""
    if isinstance(value, bool) or value is None:
        return value
    text = str(value).strip().lower()
    if text in ("", "none"):
        return None
    if text in ("1", "true", "yes", "y"):
        return True
    if text in ("0", "false", "no", "n"):
        return False
    raise LabelError(f"{field} {value!r} is not a yes/no value")


def read_label_file(uri: str, annotator: str = "file") -> pa.Table:
    """Rows ``region_id, label[, is_failure]`` from a ``.csv`` or ``.json`` (a list of objects).

    A row whose label is "not a failure" (or whose ``is_failure`` is false) marks the region as fine.
    Validation against the run (unknown regions, unknown classes, duplicates) happens in
    ``write_labels``, so a bad file writes nothing.
    """
    try:
        text = read_bytes(uri).decode("utf-8")
    except (StorageError, UnicodeDecodeError) as exc:
        raise LabelError(f"cannot read label file {uri!r}: {exc}") from exc
    try:
        records = json.loads(text) if uri.endswith(".json") else list(csv.DictReader(io.StringIO(text)))
    except json.JSONDecodeError as exc:
        raise LabelError(f"label file {uri!r} is not valid JSON: {exc}") from exc
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise LabelError(f"label file {uri!r} must hold a list of rows with region_id and label")
    rows = []
    for i, rec in enumerate(records):
        if "region_id" not in rec or "label" not in rec:
            raise LabelError(f"label file {uri!r} row {i + 1}: needs 'region_id' and 'label' (has {sorted(rec)})")
        try:
            rid = int(rec["region_id"])
        except (TypeError, ValueError) as exc:
            raise LabelError(f"label file {uri!r} row {i + 1}: region_id {rec['region_id']!r} is not an integer") from exc
        label = str(rec["label"]).strip()
        flag = truthy(rec.get("is_failure"))
        is_failure = (label != NOT_A_FAILURE) if flag is None else flag
        rows.append({"region_id": rid, "label": label, "is_failure": is_failure, "source": "file",
                     "annotator": str(rec.get("annotator") or annotator)})
    return labels_table(rows)
