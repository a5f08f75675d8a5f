"""Which training images a failure region proposes to relabel: the ``RETRIEVALS`` plugins.

``kind`` (the default) looks for the training images of a region's kind wherever they lie; ``radius``
keeps to the region's membership radius in the generator's latent space (correction's real members).
Measured on the planted benchmark (README, "Fixing what was found"), the radius reaches few of a flaw's
training images: the search finds the flaw where the classifier hesitates, a small piece of the
subgroup, while the mislabelled rows spread far wider. A region's kind is what a person confirms when
labelling it: images that are its label L though D calls them P.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn.mixture import GaussianMixture

from genstress_ray.data import ImageSet
from genstress_ray.labeling import LabelError
from genstress_ray.real_regions import FailureRegions, RegionMembers
from genstress_ray.regions import region_log_density
from genstress_ray.registry import Registry

# A class takes part in a region when at least this share of its faults come from it or go to it.
MIXED_SHARE = 0.1
# Two modes of scores: the second Gaussian must lower BIC by this much (a clear split, not a tail).
MIN_BIC_GAIN = 10.0


@dataclass(frozen=True)
class Retrieval:
    """A way to find a failure region's training images: ``find(regions, split)`` gives each image of
    ``split`` its region (-1: none), the label the region proposes (-1: none) and a score (higher: more
    likely a row to relabel; proposals are ranked by it)."""

    name: str
    help: str
    find: Callable[[FailureRegions, ImageSet], RegionMembers]


def _radius(regions: FailureRegions, split: ImageSet) -> RegionMembers:
    """Images inside a failure region's membership radius; scored by log density under the region."""
    return regions.members(split)


def mixed_classes(region: dict, label: int) -> set[int]:
    """The classes other than ``label`` that a region's faults come from or are predicted as
    (``top_pairs`` with at least ``MIXED_SHARE`` of its faults)."""
    pairs = json.loads(region.get("top_pairs") or "[]")
    return {int(c) for true, pred, share in pairs if share >= MIXED_SHARE for c in (true, pred)} - {label}


def _gaussian_log_density(points: np.ndarray, at: np.ndarray) -> np.ndarray:
    mean = points.mean(0)
    cov = np.cov(points.T).reshape(len(mean), len(mean))
    cov += 1e-3 * np.trace(cov) / len(mean) * np.eye(len(mean))  # ridge: classes can be small
    _, log_det = np.linalg.slogdet(cov)
    d = at - mean
    return -0.5 * (np.einsum("ij,ij->i", d, np.linalg.solve(cov, d.T).T) + log_det + len(mean) * np.log(2 * np.pi))


def kind_scores(latents: np.ndarray, labels: np.ndarray, true: int, given: int) -> tuple[np.ndarray, np.ndarray]:
    """For the images labelled ``given``: log N(z; class ``true``) - log N(z; class ``given``), each class a
    Gaussian of its own images' latents, and which of them are proposed.

    Proposed: every image more likely under ``true`` than under ``given``; and when the scores of the
    images labelled ``given`` fall in two clear modes with the upper one a minority (a subgroup that
    looks like ``true``), the whole upper mode. The second rule is what reaches a systematic flaw: its
    images sit in the tail of ``true`` (they were taken out of it), so few pass the first.

    >>> rng = np.random.default_rng(0)
    >>> ones, sevens, flaw = rng.normal(0, 1, (300, 2)), rng.normal(8, 1, (300, 2)), rng.normal(2.5, .5, (60, 2))
    >>> z, y = np.concatenate([ones, sevens, flaw]), np.array([1] * 300 + [7] * 360)
    >>> score, proposed = kind_scores(z, y, true=1, given=7)
    >>> int(proposed[:300].sum()), int(proposed[300:].sum())
    (0, 60)
    """
    own = np.flatnonzero(labels == given)
    mine, theirs = latents[labels == true], latents[own]
    if min(len(mine), len(theirs)) < latents.shape[1] + 2:
        return np.zeros(len(own)), np.zeros(len(own), bool)
    score = _gaussian_log_density(mine, theirs) - _gaussian_log_density(theirs, theirs)
    proposed = score > 0
    x = score[:, None]
    two = GaussianMixture(2, random_state=0).fit(x)
    upper = int(np.argmax(two.means_.ravel()))
    if GaussianMixture(1, random_state=0).fit(x).bic(x) - two.bic(x) > MIN_BIC_GAIN and two.weights_[upper] < 0.5:
        proposed |= two.predict_proba(x)[:, upper] > 0.5
    return score, proposed


def _kind(regions: FailureRegions, split: ImageSet) -> RegionMembers:
    """Every training image of a failure region's kind: labelled P, a class the region's faults mix
    with its label L, and placed by the generator's latent space with class L (``kind_scores``). Among
    regions with the same L and P an image goes to the one it is most likely under."""
    n = len(split.labels)
    region, target, score = np.full(n, -1), np.full(n, -1), np.full(n, -np.inf)
    rows = regions.regions.to_pylist()
    pairs: dict[tuple[int, int], list[int]] = {}
    for j, row in enumerate(rows):
        label = regions.failure_labels.get(row["region_id"])
        for given in (mixed_classes(row, label) if label is not None else ()):
            pairs.setdefault((label, given), []).append(j)
    if not pairs:
        return RegionMembers(split, region, target, score)
    latents = regions.latents(split.images).astype(np.float64)
    density = region_log_density(regions.regions, latents)
    for (true, given), columns in sorted(pairs.items()):
        own = np.flatnonzero(split.labels == given)
        s, proposed = kind_scores(latents, split.labels, true, given)
        better = proposed & (s > score[own])  # an image two pairs propose goes to its higher score
        take = own[better]
        nearest = np.asarray(columns)[density[np.ix_(take, columns)].argmax(1)] if len(take) else []
        region[take] = [rows[j]["region_id"] for j in nearest]
        target[take], score[take] = true, s[better]
    return RegionMembers(split, region, target, score)


RETRIEVALS: Registry[Retrieval] = Registry("retrieval", LabelError)
for _retrieval in (
    Retrieval("kind", "the training images of each failure region's kind wherever they lie: labelled as a class the "
                      "region mixes with its label, and closer to the region's label in the generator's latent space",
              _kind),
    Retrieval("radius", "the training images inside each failure region's membership radius (--quantile)", _radius),
):
    RETRIEVALS.register(_retrieval.name, _retrieval)
