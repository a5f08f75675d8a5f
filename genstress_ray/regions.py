"""Distillation: a Dirichlet-process Gaussian mixture over failure latents = misclassification regions.

Follows Defuse: fit scikit-learn's ``BayesianGaussianMixture`` (DP prior, full covariances, an upper
bound on the number of components), keep the components whose weight exceeds ``weight_threshold``,
then sample each region N(mu, tau * Sigma) for labelling.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import BayesianGaussianMixture

from genstress_ray.storage import REGIONS_SCHEMA

log = logging.getLogger(__name__)



@dataclass
class RegionFit:
    """What ``fit_regions`` found: the regions table and, when no fit was possible, why."""

    table: pa.Table
    n_faults: int
    n_fitted: int
    message: str = ""
    converged: bool | None = None
    components: int = 0


def _dominant(values: np.ndarray) -> tuple[int, float]:
    """The most common class and its share; -1 when no member has one (KLDB's boundary samples have
    no intended class)."""
    known = values[values >= 0]
    if len(known) == 0:
        return -1, 0.0
    counts = np.bincount(known)
    return int(counts.argmax()), float(counts.max() / len(values))


def top_pairs(source_labels: np.ndarray, preds: np.ndarray, k: int = 3) -> list[list]:
    """The ``k`` most common (true, predicted) pairs with their shares, most common first.

    >>> top_pairs(np.array([1, 1, 7, 7, 7]), np.array([7, 7, 1, 1, 1]))
    [[7, 1, 0.6], [1, 7, 0.4]]
    """
    pairs, counts = np.unique(np.stack([source_labels, preds], 1), axis=0, return_counts=True)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:k]
    return [[int(pairs[i, 0]), int(pairs[i, 1]), round(float(counts[i] / len(preds)), 4)] for i in order]


def region_pairs(region: dict, class_names: list[str], k: int = 2) -> str:
    """``true 3 -> predicted 9 (62%), true 8 -> predicted 9 (21%)`` for a row of the regions table."""
    from genstress_ray.data import class_name

    pairs = json.loads(region["top_pairs"]) if region.get("top_pairs") else \
        [[region["dominant_source_label"], region["dominant_pred"], region["dominant_pred_share"]]]
    return ", ".join(f"true {class_name(class_names, t)} -> predicted {class_name(class_names, p)} ({share:.0%})"
                     for t, p, share in pairs[:k])


def region_gaussian(row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A regions-table row as (mean (d,), basis (r, d), cov (r, r)); the basis is the identity for a
    region fitted in the latent space itself."""
    mean = np.asarray(row["mean"], np.float64)
    basis = np.asarray(row.get("basis") or np.eye(len(mean)), np.float64).reshape(-1, len(mean))
    return mean, basis, np.asarray(row["cov"], np.float64).reshape(len(basis), len(basis))


def _whitened(row: dict, latents: np.ndarray) -> tuple[np.ndarray, float, int]:
    """Squared Mahalanobis distances (N,) of latents to a region, in the space it was fitted in; the
    log-determinant of its covariance; that space's dimension."""
    mean, basis, cov = region_gaussian(row)
    chol = np.linalg.cholesky(cov + 1e-9 * np.eye(len(cov)))
    z = np.linalg.solve(chol, ((latents - mean) @ basis.T).T)
    return (z ** 2).sum(0), 2 * np.log(np.diag(chol)).sum(), len(cov)


def region_log_density(regions: pa.Table, latents: np.ndarray) -> np.ndarray:
    """log(weight x N(latent; mean, cov)) of every latent (N, d) under every region: (N, R).

    Densities are taken in the space each region was fitted in (its principal-component ``basis``
    when it has one), so they are comparable across regions of one fit.
    """
    latents = np.asarray(latents, np.float64)
    out = np.full((len(latents), regions.num_rows), -np.inf)
    for j, row in enumerate(regions.to_pylist()):
        distance, log_det, dims = _whitened(row, latents)
        out[:, j] = np.log(row["weight"]) - 0.5 * (distance + log_det + dims * np.log(2 * np.pi))
    return out


@dataclass
class RealMembership:
    """Which real images fall inside which region (``assign_real``).

    ``region``: the region id of each image, or -1 for the rest of the data (the mixture was fitted on
    failures only, so most real images belong to no region). ``radius``: per region, the squared
    Mahalanobis distance within which it claims an image (the ``quantile`` of its own members'
    distances); ``members``: real images per region; ``log_density``: each image's log density under
    its region's Gaussian (-inf outside every region), how typical of the region it is.
    """

    region: np.ndarray
    radius: dict[int, float]
    members: dict[int, int]
    quantile: float
    log_density: np.ndarray

    def criterion(self) -> str:
        return membership_criterion(self.quantile)


def membership_criterion(quantile: float) -> str:
    """How ``assign_real`` places a real image, in words."""
    return (f"inside a region when its squared Mahalanobis distance to the region is within the "
            f"{quantile:.0%} quantile of the region's own faults' distances (the highest-density "
            "such region when several claim it); every other image belongs to no region")


@dataclass
class Footprint:
    """Where a region's own faults lie: its row of the regions table, its faults' latents (each fault
    counted in its highest-density region) and its membership radius (the ``quantile`` of their
    squared Mahalanobis distances to it)."""

    row: dict
    points: np.ndarray
    radius: float
    classes: frozenset = frozenset()  # the classes its faults come from or were predicted as

    def contains(self, latents: np.ndarray) -> np.ndarray:
        """Mask of the latents (N, d) within this region's membership radius."""
        if not len(latents):
            return np.zeros(0, bool)
        return _whitened(self.row, np.asarray(latents, np.float64))[0] <= self.radius


def footprints(regions: pa.Table, fault_latents: np.ndarray, quantile: float = 0.9,
               fault_classes: np.ndarray | None = None) -> dict[int, Footprint]:
    """Every region's ``Footprint`` (by region id), from the faults it was fitted on; ``fault_classes``
    (N, 2): each fault's source and predicted class, which give each footprint its ``classes``."""
    rows = regions.to_pylist()
    fault_latents = np.asarray(fault_latents, np.float64)
    home = region_log_density(regions, fault_latents).argmax(1) if len(fault_latents) and rows else np.zeros(0, int)
    out = {}
    for j, row in enumerate(rows):
        points = fault_latents[home == j]
        own = _whitened(row, points)[0] if len(points) else np.zeros(0)
        classes = frozenset() if fault_classes is None else frozenset(
            int(c) for c in np.asarray(fault_classes)[home == j].ravel() if c >= 0)
        out[row["region_id"]] = Footprint(row, points, float(np.quantile(own, quantile)) if len(own) else 0.0,
                                          classes)
    return out


def containment(a: Footprint, b: Footprint) -> float:
    """How much two regions are one: the larger of the share of ``a``'s faults inside ``b``'s
    membership radius and of ``b``'s inside ``a``'s, in [0, 1] (one region lying within the other: a
    region refitted as two halves still matches the whole). Regions of latents of different lengths
    share 0.

    Unlike an overlap of the two fitted Gaussians, it asks of each region only what it is sure of
    (where its own faults lie and how far they reach), so a region refitted from the same faults with
    another seed, or from another version's faults of the same flaw, keeps a high score even when its
    Gaussian came out another shape (README, "Nightly scans").

    >>> row = {"mean": [0.0, 0.0], "cov": [1.0, 0.0, 0.0, 1.0]}
    >>> pts = np.random.default_rng(0).normal(size=(200, 2))
    >>> here, there = Footprint(row, pts, 4.6), Footprint({**row, "mean": [9.0, 0.0]}, pts + [9, 0], 4.6)
    >>> round(containment(here, here), 2), containment(here, there)
    (0.91, 0.0)
    """
    return max(containments(a, b))


def containments(a: Footprint, b: Footprint) -> tuple[float, float]:
    """The share of ``a``'s faults inside ``b``'s membership radius, and of ``b``'s inside ``a``'s."""
    if not len(a.points) or not len(b.points) or len(a.row["mean"]) != len(b.row["mean"]):
        return 0.0, 0.0
    return float(b.contains(a.points).mean()), float(a.contains(b.points).mean())


def assign_real(regions: pa.Table, fault_latents: np.ndarray, latents: np.ndarray, quantile: float = 0.9) -> RealMembership:
    """Assign real images' latents (N, d) to regions, with a membership radius calibrated per region on
    the faults it was fitted on (``fault_latents``, each counted in its highest-density region).

    Responsibilities alone put every image in some region; a radius calibrated on each region's own
    members keeps only images as close to it as its faults are.
    """
    latents = np.asarray(latents, np.float64)
    ids = regions["region_id"].to_pylist()
    if not ids or not len(latents):
        return RealMembership(np.full(len(latents), -1, np.int64), {}, {}, quantile, np.full(len(latents), -np.inf))
    own = footprints(regions, fault_latents, quantile)
    radius = {rid: own[rid].radius for rid in ids}
    inside = np.stack([own[rid].contains(latents) for rid in ids], 1)
    density = np.where(inside, region_log_density(regions, latents), -np.inf)
    region = np.where(inside.any(1), np.asarray(ids)[density.argmax(1)], -1)
    return RealMembership(region, radius, {i: int((region == i).sum()) for i in ids}, quantile, density.max(1))


def fit_regions(latents: np.ndarray, source_labels: np.ndarray, preds: np.ndarray, max_components: int = 100,
                weight_threshold: float = 0.01, max_points: int = 50_000, seed: int = 0,
                max_iter: int = 500, max_dims: int = 32) -> RegionFit:
    """Fit the DP-GMM on failure latents (N, d) and return the regions: components with weight >
    ``weight_threshold`` that at least one fault belongs to.

    Latents longer than ``max_dims`` (the styles of a style-based generator: num_ws x w_dim) are
    first projected on their ``max_dims`` principal components: full covariances in hundreds of
    dimensions cost O(d^3) per component and are mostly unidentifiable from a few hundred faults.

    With fewer than 2 faults there is nothing to cluster: the result is an empty table and a message.
    More than ``max_points`` faults are subsampled (seeded) for the fit; membership counts then use all.

    >>> rng = np.random.default_rng(0)
    >>> z = np.concatenate([rng.normal(-5, .1, (50, 2)), rng.normal(5, .1, (50, 2))])
    >>> fit = fit_regions(z, np.zeros(100, int), np.ones(100, int), max_components=5)
    >>> sorted({round(m[0]) for m in fit.table["mean"].to_pylist()})
    [-5, 5]
    """
    n, empty = len(latents), REGIONS_SCHEMA.empty_table()
    if n < 2:
        msg = f"{n} fault{'s' if n != 1 else ''} found: at least 2 are needed to fit regions; no regions written"
        return RegionFit(empty, n, 0, message=msg)
    latents = np.asarray(latents, np.float64)
    fit_on = latents
    if n > max_points:
        fit_on = latents[np.random.default_rng(seed).choice(n, max_points, replace=False)]
    basis, centre = None, np.zeros(latents.shape[1])
    if latents.shape[1] > max_dims:
        pca = PCA(n_components=min(max_dims, len(fit_on)), random_state=seed).fit(fit_on)
        basis, centre = pca.components_, pca.mean_
        latents, fit_on = (latents - centre) @ basis.T, (fit_on - centre) @ basis.T
    k = min(max_components, len(fit_on))
    gmm = BayesianGaussianMixture(n_components=k, covariance_type="full",
                                  weight_concentration_prior_type="dirichlet_process",
                                  max_iter=max_iter, random_state=seed, reg_covar=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(fit_on)
    if not gmm.converged_:
        log.warning("DP-GMM did not converge in %d iterations; regions are from the last iterate", max_iter)
    members = gmm.predict(latents)
    counts = np.bincount(members, minlength=k)
    # A component can keep prior weight with no members at all; such a component is no region.
    kept = [c for c in np.argsort(-gmm.weights_) if gmm.weights_[c] > weight_threshold and counts[c] > 0]
    rows = []
    for region_id, c in enumerate(kept):
        in_c = members == c
        src, src_share = _dominant(source_labels[in_c])
        prd, prd_share = _dominant(preds[in_c])
        rows.append({"region_id": region_id, "weight": float(gmm.weights_[c]),
                     "mean": (gmm.means_[c] if basis is None else centre + gmm.means_[c] @ basis).astype(np.float32).tolist(),
                     "cov": gmm.covariances_[c].astype(np.float32).ravel().tolist(),
                     "basis": None if basis is None else basis.astype(np.float32).ravel().tolist(),
                     "n_members": int(in_c.sum()), "dominant_source_label": src, "dominant_source_share": src_share,
                     "dominant_pred": prd, "dominant_pred_share": prd_share,
                     "top_pairs": json.dumps(top_pairs(source_labels[in_c], preds[in_c]))})
    table = pa.Table.from_pylist(rows, schema=REGIONS_SCHEMA) if rows else empty
    msg = "" if rows else f"no mixture component has weight > {weight_threshold}"
    return RegionFit(table, n, len(fit_on), message=msg, converged=bool(gmm.converged_), components=k)


def sample_regions(regions: pa.Table, per_region: int, tau: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``per_region`` latents from N(mean, tau * cov) of each region.

    Returns (region ids (M,), latents (M, d) float32). Each region has its own seeded stream, so a
    region's samples do not depend on which other regions exist.
    """
    if regions.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    ids, draws = [], []
    for row in regions.to_pylist():
        mean, basis, cov = region_gaussian(row)
        rng = np.random.default_rng([seed, row["region_id"]])
        offsets = rng.multivariate_normal(np.zeros(len(basis)), tau * cov, size=per_region, method="cholesky")
        draws.append(mean + offsets @ basis)
        ids.append(np.full(per_region, row["region_id"], np.int64))
    return np.concatenate(ids), np.concatenate(draws).astype(np.float32)
