"""Region matching and status rules of nightly scans (pure numpy)."""

import numpy as np
import pytest

from genstress_ray.scan.tracking import alerts, bhattacharyya, closest, is_failing, match_regions, next_status


def region(mean, cov, region_id=0, basis=None):
    return {"region_id": region_id, "mean": list(mean), "cov": np.asarray(cov, float).ravel().tolist(),
            "basis": None if basis is None else np.asarray(basis, float).ravel().tolist()}


def test_overlap_is_one_for_the_same_gaussian_and_falls_with_distance_and_shape():
    a = region([0, 0], np.eye(2))
    assert bhattacharyya(a, a) == pytest.approx(1.0)
    near, far = region([1, 0], np.eye(2)), region([6, 0], np.eye(2))
    assert 0 < bhattacharyya(a, far) < bhattacharyya(a, near) < 1
    assert bhattacharyya(a, near) == pytest.approx(bhattacharyya(near, a))
    # Same mean, another shape: less than identical, more than a shifted twin.
    assert bhattacharyya(a, far) < bhattacharyya(a, region([0, 0], np.eye(2) * 25)) < 1
    # Closed form for equal covariances: exp(-|d|^2 / 8).
    assert bhattacharyya(a, near) == pytest.approx(np.exp(-1 / 8))


def test_regions_fitted_on_principal_components_are_compared_in_their_basis():
    basis = np.eye(3)[:2]  # a region fitted on the first two of three latent dimensions
    pca = region([0, 0, 5], np.eye(2), basis=basis)
    full = region([0, 0, 5], np.diag([1, 1, 1]))
    assert bhattacharyya(pca, full) == pytest.approx(1.0, abs=1e-3)
    assert bhattacharyya(pca, region([4, 0, 5], np.eye(3))) < 0.2
    assert bhattacharyya(region([0], [[1]]), full) == 0.0  # different latent lengths never match


def test_each_current_region_matches_its_best_tracked_region_above_the_threshold():
    tracked = [("a", region([0, 0], np.eye(2))), ("b", region([5, 5], np.eye(2)))]
    current = [region([0.2, 0], np.eye(2), 0), region([5, 4.8], np.eye(2), 1), region([-9, 9], np.eye(2), 2)]
    matched = match_regions(current, tracked, threshold=0.5)
    assert {k: v[0] for k, v in matched.items()} == {0: "a", 1: "b"}
    assert matched[0][1] == pytest.approx(np.exp(-0.04 / 8))
    assert match_regions(current, tracked, threshold=0.999999) == {}
    assert closest(current[2], tracked)[0] == "a" and closest(current[2], []) is None


def test_status_follows_failing_and_the_previous_status():
    assert is_failing(0.95, 0.9, overlapped=True) and is_failing(0.5, 0.9, overlapped=False)
    assert not is_failing(0.95, 0.9, overlapped=False) and is_failing(None, 0.9, overlapped=False)
    history = []
    for failing in (True, True, False, False, True, True, False):
        history.append(next_status(history[-1] if history else None, failing))
    assert history == ["new", "persisting", "fixed", "fixed", "regressed", "persisting", "fixed"]


def test_alerts_name_each_crossed_threshold():
    def tracked(rid, status, accuracies, faults=10):
        return {"id": rid, "status": status, "faults": faults, "history": [{"accuracy": a} for a in accuracies]}

    regions = [tracked("r1", "regressed", [0.95, 0.3]), tracked("r2", "new", [0.1], faults=80),
               tracked("r3", "new", [0.2], faults=5), tracked("r4", "fixed", [0.99, 0.97])]
    lines = alerts(regions, regressed=True, new_region_faults=50, accuracy_drop=0.2)
    assert len(lines) == 3
    assert "r1 regressed" in lines[0] and "accuracy fell 95.0% -> 30.0%" in lines[1] and "r2 with 80 faults" in lines[2]
    assert alerts(regions, regressed=False, new_region_faults=None, accuracy_drop=None) == []
