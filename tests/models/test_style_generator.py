"""The style-based generator protocol: the built-in GAN and a user's StyleGAN-shaped module."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY_STYLEGAN
from genstress_ray.data import get_source
from genstress_ray.models import ModelError, StyleGenerator, get_model, load_module, model_kind
from genstress_ray.models.gan_training import train_stylegan
from genstress_ray.models.training import train_and_save

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # makes tests.models.factories importable


def _generators(tmp_path):
    """The two ways a style generator enters: the built-in, and state dict + user factory."""
    torch.manual_seed(0)
    from tests.models.factories import user_style_generator

    path = tmp_path / "user_g.pth"
    torch.save(user_style_generator().state_dict(), path)
    return {"builtin": (get_model("small_stylegan", **TINY_STYLEGAN), 10),
            "factory": (load_module(str(path), factory="tests.models.factories:user_style_generator")[0], None)}


@pytest.mark.parametrize("kind", ["builtin", "factory"])
def test_style_generator_contract(kind, tmp_path):
    """Shared contract: mapping -> (N, num_ws, w_dim); synthesis and decode -> images in [0, 1] of the
    data's shape; the same styles give the same image, whatever the batch."""
    net, classes = _generators(tmp_path)[kind]
    g = StyleGenerator(net, (1, 8, 8), classes).eval()
    z = torch.randn(4, g.z_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ws = g.mapping(z, g.one_hot(torch.tensor([0, 1, 2, 3])))
        images = g.synthesis(ws)
        again = g.decode(ws.flatten(1)[:1])
    assert ws.shape == (4, g.num_ws, g.w_dim) and g.latent_dim == g.num_ws * g.w_dim
    assert g.w_avg.shape == (g.w_dim,)
    assert images.shape == (4, 1, 8, 8) and 0 <= float(images.min()) and float(images.max()) <= 1
    torch.testing.assert_close(again, images[:1], rtol=1e-4, atol=1e-5)
    assert g.c_dim == (10 if kind == "builtin" else 0)


def test_a_module_without_the_protocol_is_refused():
    with pytest.raises(ModelError, match=r"has no mapping\(\) method"):
        StyleGenerator(nn.Linear(2, 2), (1, 8, 8))

    class NoAverage(nn.Module):
        num_ws, z_dim = 2, 3

        def mapping(self, z, c):
            return z

        def synthesis(self, ws):
            return ws

    with pytest.raises(ModelError, match="has no w_avg attribute"):
        StyleGenerator(NoAverage(), (1, 8, 8))


def test_class_count_and_image_shape_must_match_the_data():
    net = get_model("small_stylegan", **TINY_STYLEGAN)
    with pytest.raises(ModelError, match="conditioned on 10 classes but the classifier and dataset have 3"):
        StyleGenerator(net, (1, 8, 8), num_classes=3)
    with pytest.raises(ModelError, match=r"images of shape \(1, 8, 8\), but the classifier and dataset use \(1, 28, 28\)"):
        StyleGenerator(net, (1, 28, 28), num_classes=10)


def test_training_the_style_gan_on_digits_runs_and_round_trips(tmp_path):
    assert model_kind("small_stylegan") == "style_generator"
    train = get_source("digits", split="train", limit=256).load()
    params = {k: v for k, v in TINY_STYLEGAN.items() if k not in ("in_shape", "num_classes")}
    reference = get_model("small_cnn", in_shape=(1, 8, 8), num_classes=10, width=4, hidden=16)
    uri = str(tmp_path / "g.safetensors")
    metrics = train_and_save("style_generator", "small_stylegan", train, None, uri, params,
                             {"epochs": 2, "batch_size": 32, "reference": reference})
    assert metrics["steps"] == 2 * (256 // 32) and 0 <= metrics["validity"] <= 1
    net, meta = load_module(uri)
    assert meta["role"] == "style_generator" and float(net.w_avg.abs().sum()) > 0  # w_avg was tracked
    g = StyleGenerator(net, (1, 8, 8), 10)
    with torch.no_grad():
        images = g.synthesis(g.mapping(torch.randn(3, g.z_dim), g.one_hot(torch.tensor([1, 2, 3]))))
    assert torch.isfinite(images).all()


def test_max_seconds_stops_training_after_an_epoch():
    train = get_source("digits", split="train", limit=64).load()
    _, metrics = train_stylegan(train, params={k: v for k, v in TINY_STYLEGAN.items() if k not in ("in_shape", "num_classes")},
                                epochs=50, batch_size=32, max_seconds=0.0)
    assert metrics["epochs_run"] == 1
