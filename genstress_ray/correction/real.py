"""Whether a fix holds on real images: accuracy on the real test images that fall inside each failure
region, judged against the region's label.

The region's own generated samples are blurry decodes close to those fine-tuned on; a classifier can
learn to tell them apart from real images and still fail the real images of the same flaw. So the
test split is encoded with the run's generator, each image is assigned to a region only when it is as
close to the region as the region's own faults are (``regions.assign_real``), and each model is scored
on the failure regions' real members.
"""

from __future__ import annotations

from typing import Any

import ray

from genstress_ray.context import RunContext
from genstress_ray.correction.datasets import members_dataset, placement
from genstress_ray.correction.finetune import rate
from genstress_ray.data import Catalog
from genstress_ray.real_regions import FailureRegions

# A region's real members must reach this many before a rate is reported for it.
MIN_REAL_MEMBERS = 10


def region_placement(ctx: RunContext, regions: FailureRegions, label_with_oracle: bool = False) -> dict[str, Any]:
    """What the actors that place real images in ``regions`` are built from (``datasets.placement``)."""
    return placement(regions, ctx.models["generator"], ctx.cfg.strategy.generator_kind, ctx.image_shape,
                     ctx.class_names, ctx.oracle_ref() if label_with_oracle else None)


def real_region_datasets(ctx: RunContext, regions: FailureRegions | str,
                         splits: dict[str, tuple[ray.data.Dataset, Catalog]]) -> tuple[dict[str, ray.data.Dataset], dict]:
    """The real images inside the failure regions, labelled with their region's label (or the oracle's):
    of D's validation split (``real_region_val``, which lambda selection may use) and of the test split
    (``real_region_test``), and what says how they were chosen. ``regions`` is a message where they
    cannot be placed (no encoder); ``splits`` holds D's ``val`` and the ``test`` split as datasets."""
    if isinstance(regions, str):
        return {}, {"message": regions}
    against = ctx.cfg.correction.real_region_label
    c = ctx.cfg.correction
    place = region_placement(ctx, regions, against == "oracle")
    data, info = {}, {"min_members": MIN_REAL_MEMBERS, "regions": sorted(regions.failure_labels),
                      "quantile": regions.quantile, "label": against}
    for name in ("val", "test"):
        split, catalog = splits[name]
        data[f"real_region_{name}"] = members_dataset(split, place, c.num_cpus_per_worker, c.threads)
        info[f"{name}_images"] = catalog.rows
    info["criterion"] = regions.criterion
    return data, info


def real_region_accuracy(scores: dict[str, dict], info: dict) -> dict:
    """Per failure region and overall: its real test members and each model's accuracy on them
    (``scores``: each model's ``score`` of ``real_region_test``; a message instead of a rate below
    ``MIN_REAL_MEMBERS``)."""
    if not scores:
        return info
    per_region = {str(r): _rates({m: s["regions"].get(str(r), [0, 0]) for m, s in scores.items()})
                  for r in info["regions"]}
    return {**info, "per_region": per_region, "overall": _rates({m: [s["correct"], s["n"]] for m, s in scores.items()})}


def _rates(tallies: dict[str, list[int]]) -> dict:
    n = next(iter(tallies.values()))[1]
    if n < MIN_REAL_MEMBERS:
        return {"n": n, "message": f"too few real members ({n} < {MIN_REAL_MEMBERS}) for a rate"}
    return {"n": n, **{name: rate(t) for name, t in tallies.items()}}
