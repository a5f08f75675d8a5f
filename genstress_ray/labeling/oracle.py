"""Oracle labelling: a reference classifier labels each region's samples, as the benchmarks and the
nightly scan do instead of a person.

A region is a failure region when more than ``rho`` of its reviewed samples get a different label
from the reference than the prediction of the classifier under test; the region's label is the
reference's majority label.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from genstress_ray.data import decode_images
from genstress_ray.labeling.table import NOT_A_FAILURE, labels_table
from genstress_ray.models import Classifier
from genstress_ray.models.training import images_predictions
from genstress_ray.storage import RunStore


def reviewed_samples(region_samples: pa.Table, per_region: int) -> pa.Table:
    """The first ``per_region`` samples (by draw) of every region: what a reviewer would look at."""
    ordered = region_samples.sort_by([("region_id", "ascending"), ("draw", "ascending")])
    keep = np.zeros(ordered.num_rows, bool)
    counts: Counter = Counter()
    for i, rid in enumerate(ordered["region_id"].to_pylist()):
        if counts[rid] < per_region:
            keep[i] = True
            counts[rid] += 1
    return ordered.filter(pa.array(keep))


@torch.no_grad()
def oracle_fault_labels(faults: pa.Table, reference: Classifier, limit: int, seed: int = 0,
                        annotator: str = "oracle") -> pa.Table:
    """Sample rows of the ``labels`` table: the reference's label for up to ``limit`` faults chosen at
    random (``faults`` has ``sample_id``, ``image``, ``pred``). The paper's baseline fine-tunes on
    individually labelled faults; these are its labels."""
    order = np.sort(np.random.default_rng(seed).permutation(faults.num_rows)[:limit])
    chosen = faults.take(order)
    ids = chosen["sample_id"].to_pylist()
    if not ids:
        return labels_table([])
    images = decode_images(chosen["image"].to_pylist(), ids, None)
    truth = images_predictions(reference, images)
    tested = chosen["pred"].to_numpy()
    return labels_table([{"sample_id": sid, "label": reference.class_names[t], "is_failure": bool(t != p),
                          "source": "oracle", "annotator": annotator, "agreement": 1.0}
                         for sid, t, p in zip(ids, truth.tolist(), tested.tolist())])


@torch.no_grad()
def oracle_labels(region_samples: pa.Table, reference: Classifier, rho: float = 0.5,
                  per_region: int = 10, annotator: str = "oracle") -> pa.Table:
    """The ``labels`` table the reference classifier gives, one row per region."""
    if not 0 <= rho < 1:
        raise ValueError(f"rho must lie in [0, 1), got {rho}")
    reviewed = reviewed_samples(region_samples, per_region)
    if reviewed.num_rows == 0:
        return labels_table([])
    region, draw = reviewed["region_id"].to_numpy(), reviewed["draw"].to_numpy()
    images = decode_images(reviewed["image"].to_pylist(), [f"region {r} draw {d}" for r, d in zip(region, draw)], None)
    oracle = images_predictions(reference, images)
    tested = reviewed["pred"].to_numpy()
    rows = []
    for rid in np.unique(region).tolist():
        mask = region == rid
        preds, truth = tested[mask], oracle[mask]
        disagreement = float((truth != preds).mean())
        majority = Counter(truth.tolist()).most_common(1)[0][0]
        is_failure = disagreement > rho
        rows.append({"region_id": rid, "label": reference.class_names[majority] if is_failure else NOT_A_FAILURE,
                     "is_failure": is_failure, "source": "oracle", "annotator": annotator,
                     "agreement": float((truth == majority).mean())})
    return labels_table(rows)


def label_run(store: RunStore, reference: Classifier, rho: float = 0.5, per_region: int = 10, fault_labels: int = 5000) -> pa.Table:
    """The oracle's ``labels`` table for a run: one row per region, plus ``fault_labels`` faults one by one."""
    table = oracle_labels(store.read_table("region_samples"), reference, rho, per_region)
    if fault_labels:
        faults = store.read_table("identify", columns=["sample_id", "image", "pred"], filter=pc.field("fault"))
        table = pa.concat_tables([table, oracle_fault_labels(faults, reference, fault_labels)])
    return table
