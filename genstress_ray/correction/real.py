"""Whether a fix holds on real images: accuracy on the real test images that fall inside each failure
region, judged against the region's label.

The region's own generated samples are blurry decodes close to those fine-tuned on; a classifier can
learn to tell them apart from real images and still fail the real images of the same flaw. So the
test split is encoded with the run's generator, each image is assigned to a region only when it is as
close to the region as the region's own faults are (``regions.assign_real``), and each model is scored
on the failure regions' real members.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from genstress_ray.context import RunContext
from genstress_ray.data import ImageSet
from genstress_ray.models.training import images_accuracy, images_predictions
from genstress_ray.real_regions import FailureRegions

# A region's real members must reach this many before a rate is reported for it.
MIN_REAL_MEMBERS = 10


def real_region_data(ctx: RunContext, regions: FailureRegions | str,
                     splits: dict[str, ImageSet]) -> tuple[dict[str, np.ndarray], dict]:
    """The real images inside the failure regions, labelled with their region's label: of D's validation
    split (``real_region_val_*``, which lambda selection may use) and of the test split
    (``real_region_test_*``, with ``real_region_test_region``), and what says how they were chosen.
    ``regions`` is a message where they cannot be placed (no encoder); ``splits`` holds D's ``val`` and
    the ``test`` split, as correction loaded them."""
    if isinstance(regions, str):
        return {}, {"message": regions}
    against = ctx.cfg.correction.real_region_label
    oracle = ctx.oracle() if against == "oracle" else None
    data, info = {}, {"min_members": MIN_REAL_MEMBERS, "regions": sorted(regions.failure_labels),
                      "quantile": regions.quantile, "label": against}
    for name in ("val", "test"):
        members = regions.members(splits[name])
        inside = members.inside
        x = members.split.images[inside]
        data[f"real_region_{name}_x"], data[f"real_region_{name}_region"] = x, members.region[inside]
        data[f"real_region_{name}_y"] = members.target[inside] if oracle is None else images_predictions(oracle, x)
        info[f"{name}_images"] = len(members.split)
    info["criterion"] = regions.criterion
    return data, info


def real_region_accuracy(models: dict[str, nn.Module], data: dict[str, np.ndarray], info: dict) -> dict:
    """Per failure region and overall: its real test members and each model's accuracy on them against
    the region's label (a message instead of a rate below ``MIN_REAL_MEMBERS``)."""
    if "real_region_test_x" not in data:
        return info
    x, y, region = data["real_region_test_x"], data["real_region_test_y"], data["real_region_test_region"]
    out = {**info, "per_region": {str(r): _scores(models, x, y, region == r) for r in info["regions"]}}
    out["overall"] = _scores(models, x, y, np.ones(len(y), bool))
    return out


def _scores(models: dict[str, nn.Module], images: np.ndarray, target: np.ndarray, inside: np.ndarray) -> dict:
    n = int(inside.sum())
    if n < MIN_REAL_MEMBERS:
        return {"n": n, "message": f"too few real members ({n} < {MIN_REAL_MEMBERS}) for a rate"}
    return {"n": n, **{name: images_accuracy(m, images[inside], target[inside]) for name, m in models.items()}}
