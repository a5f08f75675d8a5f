"""Region matching and status rules of nightly scans (pure numpy and torch, no Ray)."""

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from genstress_ray.data import get_source, to_float
from genstress_ray.models.training import train_classifier, train_vae
from genstress_ray.regions import Footprint, containment, fit_regions, footprints, sample_regions
from genstress_ray.scan.tracking import (FIXED, FIXED_GENERATED, MATCH_QUANTILE, Evidence, alerts, compatible,
                                         match_regions, next_status, trend_text)
from genstress_ray.strategies import beta_noise, perturb_latents


def footprint(mean, points, radius=6.0, classes=()):
    d = len(mean)
    return Footprint({"region_id": 0, "mean": list(mean), "cov": np.eye(d).ravel().tolist(), "basis": None},
                     np.asarray(points, float), radius, frozenset(classes))


DRAWS = 40


@pytest.fixture(scope="module")
def refits():
    """Real faults, fitted four times with four seeds, each region labelled as an oracle would.

    The demo's setting, briefly trained: digits at 28x28, a 4-epoch CNN under test, a beta-VAE, Defuse
    noise (Beta(5, 5), centred) around the test split's encodings whose reconstruction the CNN gets
    right, kept where the CNN errs (plain torch, as the stage does); an oracle CNN (another seed)
    labels each region by the majority of its samples' predictions."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # trained weights, and so the faults, depend on the thread count
    torch.manual_seed(0)
    train = get_source("digits", split="train", resize=28).load()
    test = get_source("digits", split="test", resize=28).load()
    cnn, _ = train_classifier(train, None, "small_cnn", None, epochs=4)
    vae, _ = train_vae(train, None, "beta_vae", None, epochs=15, beta=4.0)
    oracle, _ = train_classifier(train, None, "small_cnn", None, epochs=6, seed=1)
    with torch.no_grad():
        mean = vae.encode(to_float(test.images))[0]
        recognised = np.repeat(cnn(vae.decode(mean)).argmax(1).numpy() == test.labels, DRAWS)
        noise = beta_noise(test.source_ids, mean.shape[1], DRAWS, 5.0, 5.0, seed=0, centred=True)
        z = perturb_latents(mean, noise).reshape(-1, mean.shape[1])
        preds = cnn(vae.decode(z)).argmax(1).numpy()
    labels = np.repeat(test.labels, DRAWS)
    fault = (preds != labels) & recognised  # the defaults: no search around a misread reconstruction
    z, labels, preds = z.numpy()[fault], labels[fault], preds[fault]
    out = {}
    for seed in range(4):
        table = fit_regions(z, labels, preds, max_components=50, seed=seed).table
        ids, samples = sample_regions(table, 20, 0.1, seed=seed)
        with torch.no_grad():
            said = oracle(vae.decode(torch.from_numpy(samples))).argmax(1).numpy()
        spots = footprints(table, z, MATCH_QUANTILE, np.stack([labels, preds], 1))
        out[seed] = {rid: (Counter(said[ids == rid].tolist()).most_common(1)[0][0], fp) for rid, fp in spots.items()}
    torch.set_num_threads(threads)
    return len(z), out


def test_the_same_faults_refit_with_another_seed_match_at_least_90_percent_of_their_regions(refits):
    n_faults, fits = refits
    assert n_faults > 200, "a realistic fault set"
    found = matched_count = 0
    for a, b in itertools.permutations(fits, 2):
        tracked = [(f"s{a}/r{rid}", label, fp) for rid, (label, fp) in fits[a].items()]
        matched, _ = match_regions(fits[b], tracked, threshold=0.5)
        found, matched_count = found + len(fits[b]), matched_count + len(matched)
    assert matched_count >= 0.9 * found, (matched_count, found)
    # The same fit matches itself whole, region for region.
    same, _ = match_regions(fits[0], [(f"s0/r{rid}", lab, fp) for rid, (lab, fp) in fits[0].items()], 0.5)
    assert {rid: tid for rid, (tid, _) in same.items()} == {rid: f"s0/r{rid}" for rid in fits[0]}


def test_two_flaws_in_different_classes_never_match_even_where_their_faults_overlap():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(50, 2))
    ones_as_seven = footprint([0, 0], points, classes={1, 7})  # true 1 -> predicted 7, labelled 1
    threes_as_eight = footprint([0.1, 0], points + [0.1, 0], classes={3, 8})  # true 3 -> predicted 8, labelled 3
    assert containment(ones_as_seven, threes_as_eight) > 0.9  # one place in latent space
    matched, nearest = match_regions({0: (3, threes_as_eight)}, [("v1/r0", 1, ones_as_seven)], threshold=0.5)
    assert matched == {} and nearest == {}
    # The same flaw named from the other side of its boundary on another night: one region.
    sevens = footprint([0.1, 0], points + [0.1, 0], classes={1, 7})
    matched, _ = match_regions({0: (7, sevens)}, [("v1/r0", 1, ones_as_seven)], threshold=0.5)
    assert matched[0][0] == "v1/r0"
    assert not compatible(7, sevens, 1, footprint([0, 0], points, classes={1, 2}))


def test_containment_is_where_faults_lie_not_the_shape_of_a_gaussian():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(40, 3))
    here = footprint([0, 0, 0], points, radius=11.3)
    # The same faults under a Gaussian fitted another shape (ten times as wide, elsewhere centred).
    wide = Footprint({"region_id": 1, "mean": [0.5, 0, 0], "cov": (np.eye(3) * 10).ravel().tolist(), "basis": None},
                     points, 2.0)
    assert containment(here, wide) > 0.9
    far = footprint([30, 0, 0], points + [30, 0, 0])
    assert containment(here, far) == 0.0 and containment(far, here) == 0.0
    assert containment(footprint([0], points[:, :1]), here) == 0.0  # latents of other lengths never match
    # A region refitted as two halves: each half lies within the whole.
    left = footprint([-1, 0, 0], points[points[:, 0] < 0])
    assert containment(left, here) == 1.0


def test_status_rests_on_real_members_and_fresh_generated_draws():
    fixed_accuracy = 0.9
    passing, real_fails = Evidence(0.97, 256, 0.95, 30), Evidence(0.97, 256, 0.40, 30)
    too_few, refound = Evidence(0.97, 256, 1.0, 4), Evidence(0.97, 256, 0.95, 30, matched=True)
    generated_fails = Evidence(0.3, 256, 0.95, 30)
    assert next_status(None, generated_fails, fixed_accuracy) == "new"
    assert next_status("new", passing, fixed_accuracy) == FIXED
    assert next_status("new", real_fails, fixed_accuracy) == FIXED_GENERATED
    assert next_status("new", too_few, fixed_accuracy) == FIXED_GENERATED
    assert next_status("new", refound, fixed_accuracy) == "persisting"
    assert next_status("new", generated_fails, fixed_accuracy) == "persisting"
    assert next_status(FIXED, refound, fixed_accuracy) == "regressed"
    assert next_status(FIXED_GENERATED, generated_fails, fixed_accuracy) == "regressed"
    assert next_status("regressed", generated_fails, fixed_accuracy) == "persisting"


def test_a_trend_shows_both_accuracies_and_alerts_name_each_crossed_threshold():
    def tracked(rid, status, accuracies, faults=10, real=(None, None)):
        return {"id": rid, "status": status, "faults": faults,
                "history": [{"accuracy": a, "real_subgroup": r, "real_subgroup_n": 12} for a, r in zip(accuracies, real)]}

    regressed = tracked("r1", "regressed", [0.95, 0.3], real=(0.9, 0.2))
    assert trend_text(regressed["history"]) == "generated 95% -> 30%, real subgroup 90% -> 20% (n 12)"
    regions = [regressed, tracked("r2", "new", [0.1], faults=80), tracked("r3", "new", [0.2], faults=5),
               tracked("r4", "fixed", [0.99, 0.97])]
    lines = alerts(regions, regressed=True, new_region_faults=50, accuracy_drop=0.2)
    assert len(lines) == 4
    assert "r1 regressed" in lines[0] and "generated 95% -> 30%" in lines[0]
    assert "generated accuracy fell 95.0% -> 30.0%" in lines[1] and "real subgroup accuracy fell 90.0% -> 20.0%" in lines[2]
    assert "r2 with 80 faults" in lines[3]
    assert alerts(regions, regressed=False, new_region_faults=None, accuracy_drop=None) == []
