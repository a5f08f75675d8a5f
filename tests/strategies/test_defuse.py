import numpy as np
import torch

from genstress_ray.strategies import beta_noise, perturb_latents, select_candidates


def test_noise_depends_only_on_seed_and_source_id_not_on_the_batch():
    together = beta_noise(["a", "b", "c"], 4, 6, 0.5, 0.5, seed=7)
    alone = beta_noise(["b"], 4, 6, 0.5, 0.5, seed=7)
    torch.testing.assert_close(together[1], alone[0])
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(beta_noise(["b"], 4, 6, 0.5, 0.5, seed=8)[0], alone[0])


def test_uncentred_noise_lies_in_unit_interval_and_centred_noise_has_zero_mean():
    a, b = 2.0, 5.0
    raw = beta_noise([f"id{i}" for i in range(200)], 5, 50, a, b, seed=0)
    assert float(raw.min()) >= 0 and float(raw.max()) <= 1
    assert abs(float(raw.mean()) - a / (a + b)) < 0.01
    centred = beta_noise([f"id{i}" for i in range(200)], 5, 50, a, b, seed=0, centred=True)
    torch.testing.assert_close(centred, raw - a / (a + b))
    assert abs(float(centred.mean())) < 0.01


def test_perturbation_adds_each_draw_to_its_own_mean():
    mean = torch.tensor([[0.0, 1.0], [10.0, 20.0]])
    noise = torch.arange(12, dtype=torch.float32).view(2, 3, 2)
    z = perturb_latents(mean, noise)
    assert z.shape == (2, 3, 2)
    torch.testing.assert_close(z[1, 2], mean[1] + noise[1, 2])


def test_selection_keeps_the_k_least_perturbed_faults_per_image():
    rng = np.random.default_rng(0)
    fault = torch.from_numpy(rng.random((20, 30)) < 0.4)
    norm = torch.from_numpy(rng.random((20, 30)))
    keep = select_candidates(fault, norm, 3)
    assert not (keep & ~fault).any()
    for i in range(20):
        kept = norm[i][keep[i]]
        assert len(kept) == min(3, int(fault[i].sum()))
        rejected_faults = norm[i][fault[i] & ~keep[i]]
        if len(rejected_faults):
            assert float(kept.max()) <= float(rejected_faults.min())
    assert select_candidates(fault, norm, None).all()
