import numpy as np
import pytest

from genstress_ray.regions import fit_regions, sample_regions


def _three_clusters(n=120, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[-6.0, 0, 0], [6.0, 0, 0], [0, 6.0, 0]])
    z = np.concatenate([rng.normal(c, 0.3, (n, 3)) for c in centres])
    src = np.repeat([1, 2, 3], n)
    pred = np.repeat([7, 8, 9], n)
    return z, src, pred, centres


def test_planted_clusters_become_regions_with_their_dominant_classes():
    z, src, pred, centres = _three_clusters()
    fit = fit_regions(z, src, pred, max_components=10, seed=0)
    regions = fit.table.to_pylist()
    assert len(regions) == 3
    for r in regions:
        nearest = int(np.argmin(np.linalg.norm(centres - np.array(r["mean"]), axis=1)))
        assert r["dominant_source_label"] == nearest + 1 and r["dominant_pred"] == nearest + 7
        assert r["dominant_pred_share"] == 1.0 and r["n_members"] == 120
    assert sum(r["n_members"] for r in regions) == len(z)


@pytest.mark.parametrize("n", [0, 1])
def test_zero_or_one_fault_gives_no_regions_and_a_message(n):
    fit = fit_regions(np.zeros((n, 3)), np.zeros(n, int), np.zeros(n, int))
    assert fit.table.num_rows == 0 and "at least 2" in fit.message
    assert fit.table.schema.names[0] == "region_id"


def test_subsample_cap_limits_the_fit_but_membership_counts_every_fault():
    z, src, pred, _ = _three_clusters(n=200)
    fit = fit_regions(z, src, pred, max_components=10, max_points=150)
    assert fit.n_fitted == 150 and fit.n_faults == 600
    assert sum(fit.table["n_members"].to_pylist()) == 600


def test_region_samples_follow_mean_and_tau_scaled_covariance():
    z, src, pred, _ = _three_clusters()
    regions = fit_regions(z, src, pred, max_components=10).table
    ids, draws = sample_regions(regions, 4000, tau=0.25, seed=3)
    assert draws.shape == (3 * 4000, 3) and sorted(set(ids.tolist())) == [0, 1, 2]
    for r in regions.to_pylist():
        mine = draws[ids == r["region_id"]]
        np.testing.assert_allclose(mine.mean(0), r["mean"], atol=0.05)
        cov = np.asarray(r["cov"]).reshape(3, 3)
        np.testing.assert_allclose(np.cov(mine.T), 0.25 * cov, atol=0.02)
    again_ids, again = sample_regions(regions, 4000, tau=0.25, seed=3)
    assert np.array_equal(again, draws)


def test_regions_name_their_true_to_predicted_pairs():
    """A region mixing 1s called 7 with 7s called 1 read "true 1 (50%) predicted as 1 (50%)"."""
    import json

    from genstress_ray.regions import region_pairs

    rng = np.random.default_rng(0)
    z = rng.normal(0, 0.1, (100, 2))
    true = np.array([1] * 50 + [7] * 50)
    fit = fit_regions(z, true, 8 - true, max_components=3)
    row = fit.table.to_pylist()[0]
    assert sorted(json.loads(row["top_pairs"])) == [[1, 7, 0.5], [7, 1, 0.5]]
    names = [str(i) for i in range(10)]
    assert region_pairs(row, names) == "true 1 -> predicted 7 (50%), true 7 -> predicted 1 (50%)"


def test_region_log_density_puts_points_in_their_own_region():
    from genstress_ray.regions import region_log_density

    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(-5, .1, (50, 2)), rng.normal(5, .1, (50, 2))])
    fit = fit_regions(z, np.zeros(100, int), np.ones(100, int), max_components=5)
    member = region_log_density(fit.table, z).argmax(1)
    means = np.asarray(fit.table["mean"].to_pylist())[member]
    assert np.all(np.sign(means[:, 0]) == np.sign(z[:, 0]))


def test_real_images_are_assigned_only_to_regions_they_are_as_close_to_as_the_regions_own_faults():
    """A planted mixture with known members: real points drawn from each region's own distribution land
    in it (about the calibration quantile of them), points between or far from the regions in none,
    although responsibilities alone would put every point in some region."""
    from genstress_ray.regions import assign_real, region_log_density

    z, src, pred, centres = _three_clusters()
    fit = fit_regions(z, src, pred, max_components=10, seed=0)
    rng = np.random.default_rng(1)
    own = np.concatenate([rng.normal(c, 0.3, (200, 3)) for c in centres])   # known members, 200 per region
    between = rng.normal([0, 0, 0], 0.3, (100, 3))                           # among the regions, in none
    far = rng.normal([0, -20.0, 5.0], 0.3, (100, 3))
    real = np.concatenate([own, between, far])
    membership = assign_real(fit.table, z, real, quantile=0.9)
    ids = fit.table["region_id"].to_numpy()
    nearest = [int(ids[np.argmin(np.linalg.norm(np.asarray(fit.table["mean"].to_pylist()) - c, axis=1))])
               for c in centres]
    for k, region in enumerate(nearest):
        got = membership.region[200 * k: 200 * (k + 1)]
        assert set(got.tolist()) <= {region, -1}                  # never another region
        assert 0.8 <= float((got == region).mean()) <= 0.97       # about the 90% quantile of its own faults
        assert membership.members[region] == int((membership.region == region).sum())
    assert (membership.region[600:] == -1).all()
    assert (region_log_density(fit.table, real[600:]).max(1) > -np.inf).all()  # responsibilities would assign them
    assert set(membership.radius) == set(ids.tolist()) and "90% quantile" in membership.criterion()
