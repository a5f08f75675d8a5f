"""KLDB guidance (issue 5, first part): boundary metrics, the guidance step, the guided sampler."""

import math

import pytest
import torch
from diffusers import UNet2DModel

from genstress_ray.metrics import class_subset, fit_temperature, kldb, subset_margin, top_in_subset
from genstress_ray.strategies.guided_diffusion import guided_sample, make_scheduler
from genstress_ray.strategies.kldb import kldb_guidance_step

CLASSES = [str(i) for i in range(10)]


def test_kldb_matches_a_hand_computation_and_is_zero_only_on_the_boundary():
    p = torch.tensor([[0.5, 0.2, 0.3]])
    subset = torch.tensor([True, False, True])
    by_hand = 0.5 * math.log(0.5 / 0.5) + 0.5 * math.log(0.5 / 0.3)
    assert abs(float(kldb(p.log(), subset)) - by_hand) < 1e-6
    uniform_on_subset = torch.tensor([[0.5, 0.0, 0.5]]).clamp_min(1e-30).log()
    assert abs(float(kldb(uniform_on_subset, subset))) < 1e-6
    assert float(kldb(torch.tensor([[0.45, 0.1, 0.45]]).log(), subset)) > 0


def test_margin_within_the_subset_and_top_c_rate():
    logits = torch.tensor([[5.0, 1.0, 0.8, 9.0], [0.0, 3.0, 2.0, -1.0]])
    subset = torch.tensor([False, True, True, False])
    assert torch.allclose(subset_margin(logits, subset), torch.tensor([0.2, 1.0]))
    assert top_in_subset(logits, subset).tolist() == [False, True]


def test_class_subset_names_unknown_classes_and_needs_two():
    assert class_subset(["4", "9"], CLASSES).nonzero().squeeze(1).tolist() == [4, 9]
    with pytest.raises(ValueError, match=r"unknown classes \['chihuahua'\]"):
        class_subset(["4", "chihuahua"], CLASSES)
    with pytest.raises(ValueError, match="at least 2 distinct classes"):
        class_subset(["4", "4"], CLASSES)


def test_temperature_scales_with_the_logits():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (2000,), generator=gen)
    logits = torch.randn(2000, 5, generator=gen)
    logits[torch.arange(2000), labels] += 1.5
    t1, t3 = fit_temperature(logits, labels), fit_temperature(3 * logits, labels)
    assert t1 > 0 and abs(t3 / t1 - 3) < 0.01


def test_guidance_steps_reduce_kldb_on_a_toy_classifier():
    torch.manual_seed(0)
    clf = torch.nn.Linear(6, 2)  # its decision boundary is a hyperplane, where KLDB is 0
    subset = torch.tensor([True, True])
    x = 3 * torch.randn(32, 6)
    with torch.no_grad():
        before = kldb(clf(x), subset)
        for _ in range(10):
            x, ok = kldb_guidance_step(x, lambda z: z, clf, subset, alpha=0.02)
            assert ok.all()
        after = kldb(clf(x), subset)
    assert float(after.median()) < 0.5 * float(before.median())


def test_zero_or_non_finite_gradients_are_skipped_per_sample():
    subset = torch.tensor([True, True])

    def clf(z):  # row 0 is constant (zero gradient), row 1 blows up, row 2 is fine
        logits = torch.stack([z[:, 0], -z[:, 0]], 1)
        return torch.cat([torch.zeros(1, 2), logits[1:2] * float("inf"), logits[2:]])

    x = torch.tensor([[1.0], [2.0], [3.0]])
    moved, ok = kldb_guidance_step(x, lambda z: z, clf, subset, alpha=0.1)
    assert ok.tolist() == [False, False, True]
    assert torch.equal(moved[:2], x[:2]) and not torch.equal(moved[2], x[2])
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        kldb_guidance_step(x, lambda z: z, clf, subset, alpha=-0.1)


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=11).eval()


@pytest.mark.parametrize("scheduler", ["lms", "ddim"])
def test_guided_sampler_is_batched_and_deterministic(scheduler):
    unet, clf = _tiny_unet(), torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    subset = class_subset(["4", "9"], CLASSES)
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(class_schedule=lambda i: torch.tensor([4, 9])[i % 2].repeat(6), null_class=10, classifier=clf,
                  subset=subset, steps=10, guidance_every=2, beta=3.0, decode=lambda x: (x * 0.5 + 0.5).clamp(0, 1))
    a, moved = guided_sample(unet, make_scheduler(scheduler), noise, alpha=0.1, **kwargs)
    b, _ = guided_sample(unet, make_scheduler(scheduler), noise, alpha=0.1, **kwargs)
    assert a.shape == (6, 1, 8, 8) and torch.equal(a, b)
    assert moved.shape == (6,) and int(moved.max()) <= 5  # at most one move per guided step (10 / 2)
    plain, none = guided_sample(unet, make_scheduler(scheduler), noise, alpha=0.0, **kwargs)
    assert int(none.sum()) == 0


def test_guidance_moves_ddim_samples_toward_the_boundary():
    unet, clf = _tiny_unet(), torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    subset = class_subset(["4", "9"], CLASSES)
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(class_schedule=lambda i: torch.tensor([4, 9])[i % 2].repeat(6), null_class=10, classifier=clf,
                  subset=subset, steps=10, guidance_every=2, beta=3.0, decode=lambda x: (x * 0.5 + 0.5).clamp(0, 1))
    with torch.no_grad():
        base = kldb(clf(guided_sample(unet, make_scheduler("ddim"), noise, alpha=0.0, **kwargs)[0]), subset)
        guided = kldb(clf(guided_sample(unet, make_scheduler("ddim"), noise, alpha=0.3, **kwargs)[0]), subset)
    assert float(guided.median()) < float(base.median())


def test_bad_sampler_settings_are_refused():
    with pytest.raises(ValueError, match="'euler_ancestral' is not deterministic"):
        make_scheduler("euler_ancestral")
    with pytest.raises(ValueError, match=r"guidance_every \(k\) must be >= 1"):
        guided_sample(_tiny_unet(), make_scheduler("ddim"), torch.zeros(1, 1, 8, 8), lambda i: torch.tensor([0]), 10,
                      guidance_every=0)


def test_small_ddpm_trains_round_trips_and_samples_with_guidance(tmp_path):
    from genstress_ray.data import get_source
    from genstress_ray.models import load_module, model_kind
    from genstress_ray.models.training import train_and_save

    assert model_kind("small_ddpm") == "diffusion_model"
    train = get_source("digits", split="train", limit=128).load()
    uri = str(tmp_path / "ddpm.safetensors")
    metrics = train_and_save("diffusion_model", "small_ddpm", train, None, uri,
                             {"channels": [8, 16], "norm_num_groups": 4}, {"epochs": 2, "batch_size": 32})
    assert metrics["steps"] == 8 and math.isfinite(metrics["loss"])
    unet, meta = load_module(uri)
    assert meta["role"] == "diffusion_model" and unet.config.num_class_embeds == 11  # 10 classes + null
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    images, moved = guided_sample(unet, make_scheduler("ddim"), torch.randn(4, 1, 8, 8), lambda i: torch.full((4,), 3),
                                  null_class=10, classifier=clf, subset=class_subset(["3", "5"], CLASSES), steps=6,
                                  guidance_every=3, alpha=0.1, decode=lambda x: (x * 0.5 + 0.5).clamp(0, 1))
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all() and int(moved.max()) <= 2
