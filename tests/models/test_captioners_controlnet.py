"""The LLM-counterfactual method's models: a captioner folder (tiny random BLIP) and ControlNet
regeneration (tiny random Stable Diffusion + ControlNet), built from configs."""

from __future__ import annotations

import numpy as np
import pytest

from genstress_ray.counterfactuals.control import CONTROLS
from genstress_ray.models import ModelError
from genstress_ray.models.captioners import TransformersCaptioner
from genstress_ray.models.controlnet import ControlNetRegenerator

from models.factories import write_tiny_blip, write_tiny_controlnet, write_tiny_stable_diffusion

WORDS = {"a", "an", "the", "red", "blue", "sign", "on", "street", "photo", "of"}


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("blip")
    write_tiny_blip(folder)
    return str(folder)


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("controlnet")
    write_tiny_stable_diffusion(root / "sd")
    write_tiny_controlnet(root / "sd", root / "canny")
    write_tiny_controlnet(root / "sd", root / "one-channel", conditioning_channels=1)
    return str(root / "sd"), str(root)


def test_captions_are_sampled_seeded_and_joined(blip):
    images = np.random.default_rng(0).integers(0, 255, (3, 1, 8, 8), dtype=np.uint8)  # grey, any size
    captioner = TransformersCaptioner(blip, min_new_tokens=3, max_new_tokens=6, seed=1)
    captions = captioner.caption(images)
    assert len(captions) == 3 and all(captions)
    assert {w for c in captions for w in c.replace(".", " ").split()} <= WORDS
    assert captioner.caption(images) == captions  # seeded
    assert TransformersCaptioner(blip, min_new_tokens=3, max_new_tokens=6, seed=2).caption(images) != captions
    assert captioner.caption(images[:0]) == []
    from genstress_ray.counterfactuals import CAPTIONERS

    same = CAPTIONERS.get("transformers")(blip, min_new_tokens=3, max_new_tokens=6, seed=1)
    assert same.caption(images) == captions


def test_a_captioner_folder_missing_files_is_named(blip, tmp_path):
    import shutil

    broken = tmp_path / "blip"
    shutil.copytree(blip, broken)
    (broken / "tokenizer_config.json").unlink()
    with pytest.raises(ModelError, match="captioner folder .* lacks tokenizer_config.json"):
        TransformersCaptioner(str(broken))
    with pytest.raises(ModelError, match="is not a folder"):
        TransformersCaptioner(str(tmp_path / "nowhere"))


def test_controlnet_regenerates_from_edges_seeded(controlnet):
    sd, root = controlnet
    sources = np.zeros((2, 3, 16, 16), np.uint8)
    sources[:, :, 4:12, 4:12] = 200
    edges = CONTROLS.get("canny")(sources)
    regen = ControlNetRegenerator(sd, f"{root}/canny", steps=2)
    out = regen.generate(edges, ["a photo of a tabby", "a photo of a chihuahua"], seeds=[0, 1], per_prompt=2)
    assert out.shape == (4, 3, 16, 16) and out.dtype == np.uint8 and out.std() > 0
    assert (regen.generate(edges, ["a photo of a tabby", "a photo of a chihuahua"], [0, 1], per_prompt=2) == out).all()
    assert (out[0] != out[1]).any()  # two images of one counterfactual differ
    other = ControlNetRegenerator(sd, f"{root}/canny", scheduler="DDIMScheduler", steps=2)
    assert other.generate(edges[:1], ["a photo of a tabby"], [0]).shape == (1, 3, 16, 16)


def test_controlnet_bad_inputs_are_named(controlnet):
    sd, root = controlnet
    edges = np.zeros((1, 3, 16, 16), np.uint8)
    with pytest.raises(ModelError, match="takes 1-channel control images, and these have 3"):
        ControlNetRegenerator(sd, f"{root}/one-channel", steps=1).generate(edges, ["a photo"], [0])
    with pytest.raises(ModelError, match="'NoSuchScheduler' is not a diffusers scheduler; e.g. "):
        ControlNetRegenerator(sd, f"{root}/canny", scheduler="NoSuchScheduler")
    with pytest.raises(ModelError, match="ControlNet folder .* failed to load"):
        ControlNetRegenerator(sd, f"{root}/missing")
