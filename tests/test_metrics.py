import math

import torch

from genstress_ray.metrics import entropy, kldb, margin, score_logits, top2_subset


def test_kldb_is_zero_on_the_boundary_and_positive_elsewhere():
    subset = torch.tensor([True, False, True])
    on_boundary = torch.log(torch.tensor([[0.5, 1e-12, 0.5]]))
    assert abs(float(kldb(on_boundary, subset))) < 1e-6
    assert float(kldb(torch.log(torch.tensor([[0.6, 0.1, 0.3]])), subset)) > 0


def test_kldb_matches_a_hand_computation():
    p = torch.tensor([0.6, 0.1, 0.3])
    expected = 0.5 * math.log(0.5 / 0.6) + 0.5 * math.log(0.5 / 0.3)
    assert abs(float(kldb(p.log()[None], torch.tensor([True, False, True]))) - expected) < 1e-6


def test_kldb_is_differentiable():
    logits = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    kldb(logits, torch.tensor([True, True, False])).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_entropy_and_margin():
    assert abs(float(entropy(torch.zeros(1, 4))) - math.log(4)) < 1e-6
    assert float(margin(torch.tensor([[1.0, 3.0, 2.5]]))) == 0.5
    assert top2_subset(torch.tensor([[1.0, 3.0, 2.5]])).tolist() == [[False, True, True]]


def test_scores_flag_faults_against_the_intended_class():
    scores = score_logits(torch.tensor([[0.0, 5.0], [5.0, 0.0]]), torch.tensor([1, 1]))
    assert scores["fault"].tolist() == [False, True]
    assert torch.allclose(scores["probs"].sum(1), torch.ones(2))
