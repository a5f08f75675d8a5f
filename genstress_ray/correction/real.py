"""Whether a fix holds on real images: accuracy on the real held-out images that fall inside each failure
region, each judged against **its own label**.

The region's own generated samples are blurry decodes close to those fine-tuned on; a classifier can
learn to tell them apart from real images and still fail the real images of the same flaw. So the
validation and test splits are encoded with the run's generator, each image is placed in a region
only when it is as close to the region as the region's own faults are (``regions.assign_real``), and
each model is scored on those members against their dataset labels, split in two:

- the **subgroup**: members whose own label is the region's label, the images the region is about
  (a fix must get them right);
- the **collateral**: members of other classes that the region's neighbourhood holds (a fix must
  not get them wrong: scored against the region's label they would reward over-correction).

The validation split's members serve lambda selection (``select_by: real_region``), the test
split's the verdict.
"""

from __future__ import annotations

from typing import Any

import ray

from genstress_ray.context import RunContext
from genstress_ray.correction.datasets import members_dataset, placement
from genstress_ray.correction.finetune import rate
from genstress_ray.data import Catalog
from genstress_ray.real_regions import FailureRegions

# A group of real members must reach this many before a rate is reported for it.
MIN_REAL_MEMBERS = 10
GROUPS = ("subgroup", "collateral")


def region_placement(ctx: RunContext, regions: FailureRegions) -> dict[str, Any]:
    """What the actors that place real images in ``regions`` are built from (``datasets.placement``)."""
    return placement(regions, ctx.models["generator"], ctx.cfg.strategy.generator_kind, ctx.image_shape,
                     ctx.class_names)


def real_member_datasets(ctx: RunContext, regions: FailureRegions | str,
                         splits: dict[str, tuple[ray.data.Dataset, Catalog]]) -> tuple[dict[str, ray.data.Dataset], dict]:
    """The real images inside the failure regions, with their own labels: of the validation split
    (``real_members_val``, which lambda selection may use) and of the test split (``real_members_test``),
    and what says how they were chosen. ``regions`` is a message where they cannot be placed (no
    encoder); ``splits`` holds the ``val`` and ``test`` splits as datasets."""
    if isinstance(regions, str):
        return {}, {"message": regions}
    c = ctx.cfg.correction
    place = region_placement(ctx, regions)
    data, info = {}, {"min_members": MIN_REAL_MEMBERS, "quantile": regions.quantile,
                      "regions": {str(r): ctx.class_names[label] for r, label in sorted(regions.failure_labels.items())}}
    for name in ("val", "test"):
        split, catalog = splits[name]
        data[f"real_members_{name}"] = members_dataset(split, place, c.num_cpus_per_worker, c.threads)
        info[f"{name}_images"] = catalog.rows
    info["criterion"] = regions.criterion
    return data, info


def real_member_accuracy(scores: dict[str, dict], info: dict) -> dict:
    """Per failure region and overall, each model's accuracy on the real test members against their own
    labels: ``subgroup``, ``collateral`` and ``all``, each with its n (``scores``: each model's
    ``score`` of ``real_members_test``; a message instead of rates below ``MIN_REAL_MEMBERS``).

    >>> s = {"before": {"n": 30, "correct": 15, "regions": {"0": [15, 30]}, "subgroup": {"0": [5, 20]},
    ...                 "collateral": {"0": [10, 10]}}}
    >>> out = real_member_accuracy(s, {"regions": {"0": "7"}})
    >>> out["overall"]["subgroup"], out["per_region"]["0"]["collateral"]["before"]
    ({'n': 20, 'before': 0.25}, 1.0)
    """
    if not scores:
        return info
    per_region = {}
    for rid, label in info["regions"].items():
        per_region[rid] = {"label": label, "all": _rates({m: s["regions"].get(rid, [0, 0]) for m, s in scores.items()}),
                           **{g: _rates({m: s[g].get(rid, [0, 0]) for m, s in scores.items()}) for g in GROUPS}}
    overall = {"all": _rates({m: [s["correct"], s["n"]] for m, s in scores.items()}),
               **{g: _rates({m: _sum(s[g].values()) for m, s in scores.items()}) for g in GROUPS}}
    return {**info, "per_region": per_region, "overall": overall}


def _sum(tallies) -> list[int]:
    tallies = list(tallies)
    return [sum(t[0] for t in tallies), sum(t[1] for t in tallies)]


def _rates(tallies: dict[str, list[int]]) -> dict:
    n = next(iter(tallies.values()))[1]
    if n < MIN_REAL_MEMBERS:
        return {"n": n, "message": f"too few real members ({n} < {MIN_REAL_MEMBERS}) for a rate"}
    return {"n": n, **{name: rate(t) for name, t in tallies.items()}}


def real_member_lines(real: dict, methods=("before", "baseline", "defuse")) -> list[str]:
    """The real-member figures, overall, as lines of the correction summary."""
    overall = real.get("overall")
    if not overall:
        return [f"real held-out members {real['message']}"] if real.get("message") else []
    lines = ["real held-out test images inside the failure regions, against their own labels:"]
    for group in ("subgroup", "collateral"):
        g = overall[group]
        shown = [m for m in methods if m in g]
        figures = ", ".join(f"{m} {g[m]:.1%}" for m in shown) if shown else g.get("message", "")
        lines.append(f"  {group:<10} n={g['n']:<5} {figures}")
    return lines
