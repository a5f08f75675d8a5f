"""Label Studio round trip: export region samples as image-classification tasks, import the export.

Each task carries the run's URI, so an export from another project (or another run) is refused.
Votes are counted per region over every annotator and sample; the majority label wins and its share
is recorded as ``agreement``.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from xml.sax.saxutils import quoteattr

import pyarrow as pa

from genstress_ray.labeling.oracle import reviewed_samples
from genstress_ray.labeling.table import NOT_A_FAILURE, LabelError, labels_table
from genstress_ray.storage import StorageError, read_bytes


def labeling_config(class_names: list[str]) -> str:
    """Label Studio's labeling config: one image, one choice among the classes and "not a failure"."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in [*class_names, NOT_A_FAILURE])
    return (f'<View>\n  <Image name="image" value="$image"/>\n  <Text name="prediction" value="$prediction"/>\n'
            f'  <Choices name="label" toName="image" choice="single" showInline="true">\n{choices}\n  </Choices>\n</View>\n')


def export_tasks(region_samples: pa.Table, class_names: list[str], run_uri: str, per_region: int = 10) -> list[dict]:
    """Tasks for Label Studio's JSON import: the first ``per_region`` samples of each region, images inline."""
    tasks = []
    for row in reviewed_samples(region_samples, per_region).to_pylist():
        tasks.append({"data": {
            "image": "data:image/png;base64," + base64.b64encode(row["image"]).decode(),
            "prediction": f"classifier says: {class_names[row['pred']]}",
            "region_id": row["region_id"], "sample_id": row["sample_id"], "genstress_run": run_uri}})
    return tasks


def annotation_choice(annotation: dict) -> str | None:
    """The first choice of a Label Studio annotation, or None."""
    results = annotation.get("result", [])
    for result in results if isinstance(results, list) else []:
        value = result.get("value", {}) if isinstance(result, dict) else {}
        choices = value.get("choices") if isinstance(value, dict) else None
        if isinstance(choices, list) and choices:
            return str(choices[0])
    return None


def import_export(uri: str, run_uri: str) -> pa.Table:
    """The ``labels`` table from Label Studio's JSON export of tasks made by ``export_tasks``."""
    try:
        tasks = json.loads(read_bytes(uri))
    except (StorageError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LabelError(f"cannot read Label Studio export {uri!r}: {exc}") from exc
    if not isinstance(tasks, list):
        raise LabelError(f"{uri!r} is not a Label Studio JSON export (expected a list of tasks)")
    for i, task in enumerate(tasks):
        where = f"{uri!r}, task {i + 1}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise LabelError(f"{where}: a task must be an object with a 'data' object, got {type(task).__name__}; "
                             "nothing imported")
        rid = task["data"].get("region_id")
        if rid is None:
            raise LabelError(f"{where}: data.region_id is missing (not a task made by genstress label "
                             "--export-label-studio); nothing imported")
        if isinstance(rid, bool) or not (isinstance(rid, int) or (isinstance(rid, str) and rid.isdigit())):
            raise LabelError(f"{where}: data.region_id {rid!r} is not a whole number; nothing imported")
        if not isinstance(task.get("annotations", []), list):
            raise LabelError(f"{where}: 'annotations' must be a list; nothing imported")
    foreign = {t["data"].get("genstress_run") for t in tasks} - {run_uri}
    if foreign:
        raise LabelError(f"{uri!r} holds tasks from another project or run ({', '.join(map(str, foreign))}), "
                         f"not {run_uri}; nothing imported")
    votes: dict[int, Counter] = {}
    annotators: dict[int, set] = {}
    for task in tasks:
        rid = int(task["data"]["region_id"])
        for annotation in task.get("annotations", []):
            if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
                continue
            choice = annotation_choice(annotation)
            if choice is not None:
                votes.setdefault(rid, Counter())[choice] += 1
                annotators.setdefault(rid, set()).add(str(annotation.get("completed_by", "unknown")))
    rows = []
    for rid in sorted(votes):
        label, count = votes[rid].most_common(1)[0]
        rows.append({"region_id": rid, "label": label, "is_failure": label != NOT_A_FAILURE,
                     "source": "label_studio", "annotator": ",".join(sorted(annotators[rid])),
                     "agreement": count / sum(votes[rid].values())})
    return labels_table(rows)
