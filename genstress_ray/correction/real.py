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
import pyarrow.compute as pc
import torch
from torch import nn

from genstress_ray.context import RunContext, load_split
from genstress_ray.data import to_float
from genstress_ray.models.training import images_accuracy
from genstress_ray.regions import assign_real

# A region's real members must reach this many before a rate is reported for it.
MIN_REAL_MEMBERS = 10
# The share of a region's own faults its membership radius takes in (``assign_real``).
MEMBER_QUANTILE = 0.9


def real_latents(ctx: RunContext, images: np.ndarray) -> np.ndarray | None:
    """Latent means of real images under the run's generator; None when it has no encoder."""
    generator = ctx.generator()
    if not callable(getattr(generator, "encode", None)):
        return None
    x = to_float(images)
    with torch.no_grad():
        return torch.cat([generator.encode(chunk)[0] for chunk in x.split(512)]).numpy() if len(x) else \
            np.zeros((0, 0))


def real_region_accuracy(ctx: RunContext, models: dict[str, nn.Module], failure_labels: dict[int, int]) -> dict:
    """Per failure region and overall: real test members and each model's accuracy on them against the
    region's label (``None`` with a reason below ``MIN_REAL_MEMBERS``)."""
    if not failure_labels:
        return {}
    test = load_split(ctx.cfg.test_spec())
    latents = real_latents(ctx, test.images)
    if latents is None:
        return {"message": f"not measured: the {ctx.cfg.strategy.generator_kind} has no encoder to place real "
                           "images in the regions"}
    faults = ctx.store.read_table("identify", columns=["latent"], filter=pc.field("fault"))
    fault_latents = np.stack(faults["latent"].to_numpy(zero_copy_only=False)) if faults.num_rows else \
        np.zeros((0, latents.shape[1]))
    membership = assign_real(ctx.store.read_table("regions"), fault_latents, latents, MEMBER_QUANTILE)
    target = np.array([failure_labels.get(int(r), -1) for r in membership.region], np.int64)
    out = {"criterion": membership.criterion(), "test_images": len(test), "min_members": MIN_REAL_MEMBERS,
           "per_region": {}}
    for rid in sorted(failure_labels):
        out["per_region"][str(rid)] = _scores(models, test.images, target, membership.region == rid)
    out["overall"] = _scores(models, test.images, target, target >= 0)
    return out


def _scores(models: dict[str, nn.Module], images: np.ndarray, target: np.ndarray, inside: np.ndarray) -> dict:
    n = int(inside.sum())
    if n < MIN_REAL_MEMBERS:
        return {"n": n, "message": f"too few real members ({n} < {MIN_REAL_MEMBERS}) for a rate"}
    return {"n": n, **{name: images_accuracy(m, images[inside], target[inside]) for name, m in models.items()}}
