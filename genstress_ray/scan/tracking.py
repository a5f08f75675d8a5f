"""Failure regions across model versions, without Ray: which regions are the same region, and what
became of each (fixed, persisting, new, regressed).

Two regions are matched by the Bhattacharyya coefficient of their Gaussians, BC = exp(-D_B). The DP-GMM
already describes every region as a Gaussian, so the overlap has a closed form (no sampling, no
seed); it is symmetric, 1 for identical Gaussians and near 0 for disjoint ones, and it compares shape
as well as position: a broad region and a tight one at the same mean overlap less than two alike ones,
which a distance between means would miss. Regions of different generators live in different latent
spaces and are never matched.

A tracked region's status at a scan follows from whether it fails on the scanned version (its
accuracy on its region test set is below ``fixed_accuracy``, or a failure region of the scan overlaps
it) and from its status at the previous scan.
"""

from __future__ import annotations

import numpy as np

from genstress_ray.regions import region_gaussian

STATUSES = ("new", "persisting", "fixed", "regressed")


def _in_basis(row: dict, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A region's Gaussian projected on the rows of ``basis`` (r, d): mean (r,), cov (r, r)."""
    mean, own, cov = region_gaussian(row)
    to = basis @ own.T
    return basis @ mean, to @ cov @ to.T


def _coefficient(a: dict, b: dict) -> float:
    """BC of ``a`` and ``b`` in the space ``a`` was fitted in (its principal-component basis, if any)."""
    basis = region_gaussian(a)[1]
    (mu_a, cov_a), (mu_b, cov_b) = _in_basis(a, basis), _in_basis(b, basis)
    ridge = 1e-6 * np.eye(len(cov_a))
    cov_a, cov_b = cov_a + ridge, cov_b + ridge
    mixed = (cov_a + cov_b) / 2
    diff = mu_a - mu_b
    logdet = lambda m: np.linalg.slogdet(m)[1]  # noqa: E731
    distance = diff @ np.linalg.solve(mixed, diff) / 8 + 0.5 * (logdet(mixed) - 0.5 * (logdet(cov_a) + logdet(cov_b)))
    return float(np.exp(-distance))


def bhattacharyya(a: dict, b: dict) -> float:
    """The Bhattacharyya coefficient of two regions (rows of a ``regions`` table), in [0, 1].

    A region fitted on principal components is a Gaussian in its basis only: the two are compared in
    the basis of the one with fewer dimensions; with as many, in each one's and the smaller overlap is
    kept, so the measure stays symmetric. Latents of different lengths overlap 0.

    >>> r = {"mean": [0.0, 0.0], "cov": [1.0, 0.0, 0.0, 1.0]}
    >>> round(bhattacharyya(r, r), 6), round(bhattacharyya(r, {**r, "mean": [8.0, 0.0]}), 6)
    (1.0, 0.000335)
    """
    if len(a["mean"]) != len(b["mean"]):
        return 0.0
    rank_a, rank_b = len(region_gaussian(a)[1]), len(region_gaussian(b)[1])
    if rank_a != rank_b:
        return _coefficient(a, b) if rank_a < rank_b else _coefficient(b, a)
    return min(_coefficient(a, b), _coefficient(b, a))


def closest(row: dict, tracked: list[tuple[str, dict]]) -> tuple[str, float] | None:
    """The tracked region (id, coefficient) that overlaps ``row`` most; None when nothing is tracked."""
    scored = [(bhattacharyya(row, old), tid) for tid, old in tracked]
    if not scored:
        return None
    coefficient, tid = max(scored)
    return tid, coefficient


def match_regions(current: list[dict], tracked: list[tuple[str, dict]],
                  threshold: float) -> dict[int, tuple[str, float]]:
    """For each current region (``region_id`` -> ...), the tracked region it overlaps most, when that
    overlap is at least ``threshold``: ``{region_id: (tracked id, coefficient)}``.

    ``tracked`` holds (id, region row) pairs from earlier scans of the same campaign and generator.
    """
    found = {int(row["region_id"]): closest(row, tracked) for row in current}
    return {rid: best for rid, best in found.items() if best and best[1] >= threshold}


def is_failing(accuracy: float | None, fixed_accuracy: float, overlapped: bool) -> bool:
    """A tracked region fails on a version when a failure region of the scan overlaps it, or when the
    version gets less than ``fixed_accuracy`` of its region test samples right. Without test samples
    (``accuracy`` None) nothing shows it fixed, so it counts as failing."""
    return overlapped or accuracy is None or accuracy < fixed_accuracy


def next_status(previous: str | None, failing: bool) -> str:
    """The status of a tracked region at this scan, given its status at the previous one.

    >>> [next_status(None, True), next_status("new", True), next_status("new", False),
    ...  next_status("fixed", True), next_status("regressed", True), next_status("fixed", False)]
    ['new', 'persisting', 'fixed', 'regressed', 'persisting', 'fixed']
    """
    if previous is None:
        return "new"
    if not failing:
        return "fixed"
    return "regressed" if previous == "fixed" else "persisting"


def alerts(regions: list[dict], regressed: bool, new_region_faults: int | None,
           accuracy_drop: float | None) -> list[str]:
    """Why a scan should alert, one line per crossed threshold (empty: all is well).

    ``regions`` are the scan's tracked regions: ``id``, ``status``, ``faults``, ``history`` (each entry
    with ``accuracy``; the last entry is this scan's).
    """
    out = []
    for r in regions:
        if regressed and r["status"] == "regressed":
            out.append(f"region {r['id']} regressed: fixed at the previous scan, failing again")
        if new_region_faults and r["status"] == "new" and r.get("faults", 0) >= new_region_faults:
            out.append(f"new failure region {r['id']} with {r['faults']} faults (threshold {new_region_faults})")
        accuracies = [h.get("accuracy") for h in r["history"][-2:]]
        if accuracy_drop and len(accuracies) == 2 and None not in accuracies and \
                accuracies[0] - accuracies[1] > accuracy_drop:
            out.append(f"region {r['id']}: accuracy fell {accuracies[0]:.1%} -> {accuracies[1]:.1%} "
                       f"(more than {accuracy_drop:.0%})")
    return out
