import math

import numpy as np

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


def test_fault_detection_and_class_pairs():
    from genstress_ray.metrics import distinct_class_pairs, fault_detection

    assert fault_detection(5, 50, 200) == {"faults_per_candidate": 0.1, "faults_per_call": 0.025}
    assert np.isnan(fault_detection(0, 0, 0)["faults_per_call"])
    assert distinct_class_pairs(torch.tensor([1, 1, 2, 1]), torch.tensor([7, 7, 7, 3])) == 3


def test_mean_pairwise_distance_of_known_points():
    from genstress_ray.metrics import mean_pairwise_distance

    square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # Four sides of length 1 and two diagonals of sqrt(2), over six pairs.
    assert abs(mean_pairwise_distance(square) - (4 + 2 * 2 ** 0.5) / 6) < 1e-9
    assert np.isnan(mean_pairwise_distance(square[:1]))


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    from genstress_ray.metrics import ssim

    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert torch.allclose(ssim(x, x), torch.ones(3))
    s = ssim(x, noisy)
    assert (s < 0.9).all() and (s > -1).all()
    assert (ssim(x, (x + 0.05).clamp(0, 1)) > s).all()


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    from genstress_ray.metrics import frechet_distance

    a = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(a, a)) < 1e-6
    shifted = frechet_distance(a, a + torch.tensor([3.0, 0, 0, 0]))
    assert abs(shifted - 9.0) < 1e-4  # same covariance: |mu_a - mu_b|^2


def test_penultimate_features_use_embed_or_the_input_of_the_last_linear():
    from torch import nn

    from genstress_ray.metrics import penultimate_features
    from genstress_ray.models import get_model

    cnn = get_model("small_cnn", in_shape=(1, 8, 8), num_classes=10, width=4, hidden=16)
    x = torch.rand(5, 1, 8, 8)
    assert penultimate_features(cnn, x).shape == (5, 16)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10))
    feats = penultimate_features(mlp, x)
    assert torch.allclose(feats, mlp[:3](x)) and len(mlp[3]._forward_hooks) == 0
    # A fully convolutional (segmentation) network: the last conv's input, averaged over the image.
    fcn = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1))
    assert torch.allclose(penultimate_features(fcn, x), fcn[:2](x).mean((2, 3)))


def test_reconstruction_error_separates_real_digits_from_noise():
    from genstress_ray.data import get_source
    from genstress_ray.metrics import reconstruction_error
    from genstress_ray.models import train_vae

    train = get_source("digits", split="train").load()
    test = get_source("digits", split="test", limit=50).load()
    vae, _ = train_vae(train, params={"latent_dim": 4, "width": 8, "hidden": 32}, epochs=5)
    real = reconstruction_error(vae, test.tensors()[0])
    noise = reconstruction_error(vae, torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert real.shape == (50,) and float(torch.quantile(real, 0.95)) < float(noise.min())


def test_edge_agreement_scores_kept_layout():
    from genstress_ray.counterfactuals.control import canny
    from genstress_ray.metrics import edge_agreement

    square = np.zeros((1, 1, 32, 32), np.uint8)
    square[..., 8:24, 8:24] = 255
    moved = np.roll(square, 6, axis=3)
    edges = lambda x: torch.from_numpy(canny(x))  # noqa: E731
    same, shifted = edge_agreement(edges(square), edges(square)), edge_agreement(edges(square), edges(moved))
    assert same.item() == 1.0 and 0 < shifted.item() < 0.7  # the horizontal edges still overlap in part
    assert edge_agreement(edges(square), edges(moved), tolerance=6).item() > shifted.item()
    empty = torch.zeros(1, 3, 32, 32)
    assert edge_agreement(empty, empty).item() == 1.0 and edge_agreement(empty, edges(square)).item() == 0.0


def test_text_diversity_of_counterfactual_captions():
    from genstress_ray.metrics import text_diversity

    same = text_diversity(["a red sign on a street"] * 3)
    varied = text_diversity(["a red sign on a street", "a blue sign in a forest", "a green sign at night"])
    assert same["jaccard"] == 0 and varied["jaccard"] > 0.5 and varied["distinct_2"] > same["distinct_2"]
    assert np.isnan(text_diversity(["one text"])["jaccard"])
