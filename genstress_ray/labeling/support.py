"""Labels that a failure region supports: a check on every labels table before it is written.

A region's label says which class its images truly are. Two patterns say a label is likely wrong
(an oracle that knows the classes no better than the classifier, or a person clicking through):

- the label is neither a source class nor a predicted class of any of the region's faults: nothing
  the search found there was of that class or was mistaken for it;
- one label is given to more than half of the failure regions (with at least ``MIN_REGIONS`` of
  them): unrelated regions rarely share one true class (a GTSRB oracle called about 20 regions of a
  blurry VAE "speed limit 70").

Such a region is flagged in the ``labels`` table (``flag``), in ``genstress label``'s output and in
the report; correction leaves it out unless the user confirms it (``correction.confirm_flagged``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genstress_ray.data import class_name
from genstress_ray.regions import region_log_density
from genstress_ray.storage import RunStore

MIN_REGIONS = 3  # "more than half" of fewer failure regions says nothing


def region_classes(store: RunStore) -> dict[int, set[int]]:
    """Per region id, every class its faults come from or were predicted as (each fault counted in
    the region of highest density, as the mixture assigns it)."""
    regions = store.read_table("regions")
    faults = store.read_table("identify", columns=["latent", "source_label", "pred"], filter=pc.field("fault"))
    ids = regions["region_id"].to_pylist()
    out: dict[int, set[int]] = {rid: set() for rid in ids}
    if not ids or faults.num_rows == 0:
        return out
    latents = faults["latent"].combine_chunks().flatten().to_numpy().reshape(faults.num_rows, -1)
    home = region_log_density(regions, latents).argmax(1)
    sources, preds = faults["source_label"].to_numpy(), faults["pred"].to_numpy()
    for j, rid in enumerate(ids):
        mine = home == j
        out[rid] = {int(c) for c in np.concatenate([sources[mine], preds[mine]]) if c >= 0}
    return out


def support_flags(rows: list[dict], classes: dict[int, set[int]], class_names: list[str]) -> dict[int, str]:
    """Why each flagged failure region's label is not supported (region id -> reason).

    >>> rows = [{"region_id": r, "label": "7", "is_failure": True} for r in range(4)]
    >>> flags = support_flags(rows, {0: {1, 7}, 1: {3}, 2: {7}, 3: {7}}, [str(i) for i in range(10)])
    >>> sorted(flags), flags[1].split(";")[0]
    ([0, 1, 2, 3], "label '7' is neither a source class nor a predicted class of the region's faults (3)")
    """
    failures = [r for r in rows if r.get("region_id") is not None and r.get("is_failure")]
    flags: dict[int, list[str]] = {}
    for r in failures:
        own = classes.get(r["region_id"])
        if own is not None and r["label"] in class_names and class_names.index(r["label"]) not in own:
            found = ", ".join(class_name(class_names, c) for c in sorted(own)) or "none"
            flags.setdefault(r["region_id"], []).append(
                f"label {r['label']!r} is neither a source class nor a predicted class of the region's faults ({found})")
    counts = Counter(r["label"] for r in failures)
    if len(failures) >= MIN_REGIONS:
        for label, n in counts.items():
            if n > len(failures) / 2:
                for r in failures:
                    if r["label"] == label:
                        flags.setdefault(r["region_id"], []).append(
                            f"label {label!r} was given to {n} of the {len(failures)} failure regions")
    return {rid: "; ".join(reasons) for rid, reasons in flags.items()}


def with_flags(table: pa.Table, store: RunStore, class_names: list[str]) -> pa.Table:
    """``table`` (a ``labels`` table) with its ``flag`` column set from ``support_flags``."""
    rows = table.to_pylist()
    flags = support_flags(rows, region_classes(store), class_names)
    column = pa.array([flags.get(r["region_id"]) if r["region_id"] is not None else None for r in rows], pa.string())
    return table.set_column(table.schema.get_field_index("flag"), "flag", column)


def flagged_regions(labels: pa.Table) -> dict[int, str]:
    """The flagged failure regions of a ``labels`` table (region id -> why); a table written before
    flags existed has none."""
    if "flag" not in labels.column_names:
        return {}
    return {r["region_id"]: r["flag"] for r in labels.select(["region_id", "is_failure", "flag"]).to_pylist()
            if r["region_id"] is not None and r["is_failure"] and r["flag"]}
