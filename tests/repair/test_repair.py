"""Data repair on a small planted dataset whose mislabelled rows are known: only they are proposed, and
the accepted relabels change exactly their labels."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from genstress_ray.data import ImageSet
from genstress_ray.real_regions import FailureRegions
from genstress_ray.regions import fit_regions
from genstress_ray.repair import RepairError, apply_relabels, proposal_table, relabels_table

CLASSES = ["upright", "slanted", "other"]


class HalvesEncoder(nn.Module):
    """A real encoder with a known latent space: the mean brightness of each image half (x10)."""

    def encode(self, x: torch.Tensor):
        mu = torch.stack([x[..., :4].mean(dim=(1, 2, 3)), x[..., 4:].mean(dim=(1, 2, 3))], 1) * 10
        return mu, torch.zeros_like(mu)


def _planted(seed=0):
    """Class 0 is bright on the left, class 1 on the right; a subgroup of class 0 is bright on both
    halves, and 70% of that subgroup is labelled 1 (the planted rows)."""
    rng = np.random.default_rng(seed)
    images, labels, truth = [], [], []
    for kind, n in (("left", 60), ("right", 60), ("both", 40)):
        for _ in range(n):
            img = rng.integers(0, 20, (1, 8, 8))
            if kind in ("left", "both"):
                img[..., :4] += 200
            if kind in ("right", "both"):
                img[..., 4:] += 200
            images.append(img)
            truth.append(1 if kind == "right" else 0)
            labels.append(truth[-1])
    labels = np.asarray(labels)
    subgroup = np.flatnonzero(np.arange(len(labels)) >= 120)
    planted = np.sort(rng.choice(subgroup, 28, replace=False))
    labels[planted] = 1
    split = ImageSet(np.asarray(images, np.uint8), labels.astype(np.int64),
                     [f"planted:train:{i}" for i in range(len(labels))], CLASSES)
    return split, planted


@pytest.fixture
def members():
    split, planted = _planted()
    encoder = HalvesEncoder()
    # Faults of the subgroup as the search would find them: fresh subgroup images, encoded.
    faults_split, _ = _planted(seed=1)
    faults = encoder.encode(torch.from_numpy(faults_split.images[120:]).float() / 255)[0].numpy()
    fit = fit_regions(faults, np.zeros(len(faults), int), np.ones(len(faults), int), max_components=3)
    regions = fit.table
    failure = {rid: 0 for rid in regions["region_id"].to_pylist()}  # the oracle: these are class 0
    found = FailureRegions(encoder, regions, faults, failure, quantile=0.99).members(split)
    return found, planted


def test_only_the_planted_rows_are_proposed(members):
    found, planted = members
    # The region takes in the subgroup (both labels), never the plain classes.
    assert set(np.flatnonzero(found.inside)) <= set(range(120, 160)) and found.inside.sum() >= 30
    proposals = proposal_table(found, CLASSES)
    proposed = sorted(proposals["row"].to_pylist())
    inside_planted = [i for i in planted if found.inside[i]]
    assert proposed == inside_planted and len(proposed) >= 20
    assert set(proposals["dataset_label"].to_pylist()) == {"slanted"}
    assert set(proposals["proposed_label"].to_pylist()) == {"upright"}
    assert proposals["sample_id"].to_pylist() == [f"planted:train:{i}" for i in proposed]


def test_accepted_relabels_change_exactly_those_labels(members):
    found, _ = members
    split = found.split
    proposals = proposal_table(found, CLASSES).to_pylist()
    rejected = proposals[0]["sample_id"]
    decisions = relabels_table([{"sample_id": p["sample_id"], "label": p["proposed_label"] if p["sample_id"] != rejected
                                 else None, "accepted": p["sample_id"] != rejected, "source": "file"}
                                for p in proposals])
    labels, changes = apply_relabels(split, decisions)
    changed = np.flatnonzero(labels != split.labels)
    assert sorted(changed.tolist()) == sorted(p["row"] for p in proposals if p["sample_id"] != rejected)
    assert (labels[changed] == 0).all() and len(changes) == len(changed)
    assert changes[0] == {"sample_id": proposals[1]["sample_id"], "from": "slanted", "to": "upright"}
    # A relabel of a row the training split does not hold is named, not silently dropped.
    stray = pa.concat_tables([decisions, relabels_table([{"sample_id": "planted:train:999", "label": "upright",
                                                          "accepted": True, "source": "file"}])])
    with pytest.raises(RepairError, match="planted:train:999"):
        apply_relabels(split, stray)


def _spread_flaw(seed=0):
    """Class 0 is bright on the left, class 1 on the right; a subgroup of class 0, bright on both halves
    at any brightness from 90 to 250, is mostly labelled 1 (the planted rows)."""
    rng = np.random.default_rng(seed)

    def halves(left, right):
        img = rng.integers(0, 20, (1, 8, 8))
        img[..., :4] += left
        img[..., 4:] += right
        return img

    images = [halves(rng.integers(150, 230), 0) for _ in range(150)] + [halves(0, rng.integers(150, 230))
                                                                        for _ in range(150)]
    both = rng.integers(90, 230, 50)
    images += [halves(b, b) for b in both]
    truth = np.array([0] * 150 + [1] * 150 + [0] * 50)
    labels = truth.copy()
    planted = np.sort(300 + rng.choice(50, 40, replace=False))
    labels[planted] = 1
    split = ImageSet(np.asarray(images, np.uint8), labels.astype(np.int64),
                     [f"planted:train:{i}" for i in range(len(labels))], CLASSES)
    return split, planted


def test_kind_retrieval_reaches_a_flaw_wider_than_its_region():
    """The search found the flaw in one narrow piece (both halves at 200-220): the radius keeps to that
    piece, the region's kind (labelled 1, closer to class 0) reaches the planted rows at any brightness."""
    from genstress_ray.repair.retrieval import RETRIEVALS

    split, planted = _spread_flaw()
    encoder = HalvesEncoder()
    rng = np.random.default_rng(1)
    piece = np.stack([np.full((1, 8, 8), v) for v in rng.integers(200, 220, 40)]).astype(np.float32)
    faults = encoder.encode(torch.from_numpy(piece + rng.integers(0, 20, piece.shape)) / 255)[0].numpy()
    # Search labels carry the flaw (1); the classifier says 0 on these decodes.
    fit = fit_regions(faults, np.ones(len(faults), int), np.zeros(len(faults), int), max_components=2)
    regions = FailureRegions(encoder, fit.table, faults, {r: 0 for r in fit.table["region_id"].to_pylist()}, 0.9)
    found = {}
    for name in ("radius", "kind"):
        table = proposal_table(RETRIEVALS.get(name).find(regions, split), CLASSES)
        rows = set(table["row"].to_pylist())
        found[name] = (len(rows & set(planted)) / len(planted), len(rows & set(planted)) / max(len(rows), 1))
        assert set(table["dataset_label"].to_pylist()) <= {"slanted"}
    recall, precision = found["kind"]
    assert recall >= 0.9 and precision >= 0.9, found
    assert found["radius"][0] < 0.6, found
    # Ranked most likely first: the planted rows lead the kind's proposals.
    ranked_rows = [r["row"] for r in sorted(proposal_table(RETRIEVALS.get("kind").find(regions, split), CLASSES)
                                            .to_pylist(), key=lambda r: -r["score"])]
    assert set(ranked_rows[:30]) <= set(planted)
