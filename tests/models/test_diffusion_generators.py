"""The diffusion-generator protocol: one contract test for both families, and their bad inputs."""

import shutil

import pytest
import torch

from genstress_ray.metrics import class_subset
from genstress_ray.models import ModelError, get_model, load_module
from genstress_ray.models.diffusion_generators import (ClassConditionalDiffusion, StableDiffusion,
                                                       diffusion_generator)
from genstress_ray.strategies.guided_diffusion import guided_sample, make_scheduler

from .factories import write_tiny_stable_diffusion

SD_CLASSES = ["chihuahua", "papillon", "tabby"]
DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    write_tiny_stable_diffusion(folder)
    return str(folder)


def _pixel():
    torch.manual_seed(0)
    net = get_model("small_ddpm", in_shape=(1, 8, 8), num_classes=10, channels=(8, 16), norm_num_groups=4)
    return diffusion_generator(net, (1, 8, 8), 10), [4, 9], DIGITS, (1, 8, 8)


def _stable(folder):
    return diffusion_generator(load_module(folder, "diffusers")[0], (3, 16, 16), 3), [0, 1], SD_CLASSES, (3, 16, 16)


@pytest.mark.parametrize("family", ["pixel", "stable_diffusion"])
def test_diffusion_generator_contract(family, tiny_sd):
    generator, classes, names, image_shape = _pixel() if family == "pixel" else _stable(tiny_sd)
    assert isinstance(generator, ClassConditionalDiffusion if family == "pixel" else StableDiffusion)
    assert not any(p.requires_grad for p in generator.parameters())  # guidance moves latents, never weights
    generator.condition(classes, names, "a photo of a {classes}")
    n = 3
    x = torch.randn(n, *generator.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = generator.noise_pred(x, torch.tensor(500), 0, torch.full((n,), 3.0))
        eps_unguided = generator.noise_pred(x, torch.tensor(500), 0, torch.zeros(n))
    assert eps.shape == x.shape and torch.isfinite(eps).all() and not torch.equal(eps, eps_unguided)
    images = generator.decode(x.flatten(1))
    assert images.shape == (n, *image_shape) and 0 <= float(images.min()) and float(images.max()) <= 1
    assert generator.latent_dim == x[0].numel()
    # The whole guided loop runs and the gradient flows through decode to the latents.
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(images[0].numel(), len(names)))
    latents, out, moved = guided_sample(generator.noise_pred, make_scheduler("lms", generator.scheduler_config), x,
                                        generator.decode, clf, class_subset([names[c] for c in classes], names),
                                        alpha=0.1, beta=3.0, steps=4, guidance_every=2)
    assert latents.shape == x.shape and out.shape == images.shape and moved.tolist() == [2] * n


def test_the_prompt_names_the_boundary_classes(tiny_sd):
    generator, _, _, _ = _stable(tiny_sd)
    tokenizer = generator.parts.tokenizer
    ids = tokenizer(["a photo of a chihuahua and papillon"]).input_ids[0]
    assert tokenizer.convert_tokens_to_ids("chihuahua</w>") in ids and tokenizer.unk_token_id not in ids[1:-1]
    generator.condition([0, 1], SD_CLASSES, "a photo of a {classes}")
    first = generator.prompt_embeds.clone()
    generator.condition([0, 2], SD_CLASSES, "a photo of a {classes}")
    assert not torch.equal(first, generator.prompt_embeds)


def test_a_stable_diffusion_folder_loads_from_object_storage(tiny_sd, s3_bucket, tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setenv("GENSTRESS_CACHE", str(tmp_path / "cache"))
    s3fs.S3FileSystem().put(tiny_sd, f"{s3_bucket}/models/tiny-sd", recursive=True)
    parts, _ = load_module(f"{s3_bucket}/models/tiny-sd", "diffusers")
    local, _ = load_module(tiny_sd, "diffusers")
    assert torch.equal(parts.unet.conv_in.weight, local.unet.conv_in.weight)
    assert list((tmp_path / "cache" / "folders").iterdir())  # copied once into the cache


def test_a_folder_missing_a_component_is_named(tiny_sd, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    shutil.rmtree(broken / "vae")
    (broken / "tokenizer" / "tokenizer_config.json").unlink()
    with pytest.raises(ModelError, match=r"lacks vae/config.json, tokenizer/tokenizer_config.json"):
        load_module(str(broken), "diffusers")


def test_mismatched_pixel_models_are_refused():
    net = get_model("small_ddpm", in_shape=(1, 8, 8), num_classes=10, channels=(8, 16), norm_num_groups=4)
    with pytest.raises(ModelError, match="11 class embeddings; the dataset's 3 classes need 4"):
        diffusion_generator(net, (1, 8, 8), 3)
    with pytest.raises(ModelError, match=r"samples images of shape \(1, 8, 8\).*\(1, 28, 28\)"):
        diffusion_generator(net, (1, 28, 28), 10)
    with pytest.raises(ModelError, match="not a class-conditional UNet2DModel"):
        diffusion_generator(get_model("small_cnn", in_shape=(1, 8, 8), num_classes=10), (1, 8, 8), 10)
    generator = diffusion_generator(net, (1, 8, 8), 10)
    with pytest.raises(ModelError, match="call condition"):
        generator.noise_pred(torch.zeros(1, 1, 8, 8), torch.tensor(1), 0, torch.ones(1))


def test_the_stage_writes_samples_rows_from_stable_diffusion(tiny_sd, tmp_path):
    """The Ray stage's code, called in-process on the tiny SD folder: shapes, columns, scores against C."""
    import json

    import numpy as np

    from genstress_ray.data import decode_images
    from genstress_ray.models import save_checkpoint
    from genstress_ray.models import ModelRef
    from genstress_ray.stages.kldb import KldbSearch
    from genstress_ray.storage import SAMPLES_SCHEMA

    params = {"in_shape": [3, 16, 16], "num_classes": 3, "width": 4, "hidden": 8}
    clf_path = str(tmp_path / "rgb_cnn.safetensors")
    torch.manual_seed(0)
    save_checkpoint(get_model("small_cnn", **params), clf_path, "small_cnn", params)
    strategy = {"prompt": "a photo of a {classes}", "negative_prompt": "", "steps": 4, "guidance_every": 2,
                "scheduler": "lms", "classes": ["chihuahua", "papillon"], "keep": "all"}
    stage = KldbSearch(ModelRef(clf_path), ModelRef(tiny_sd, "diffusers"), SD_CLASSES, (3, 16, 16), seed=0,
                       generator_kind="diffusion_model", params=strategy,
                       boundary={"subset": [0, 1], "threshold": 0.1, "temperature": 1.0})
    batch = {"source_id": np.array(["seed:0", "seed:1", "seed:0"]), "alpha": np.array([0.0, 0.1, 0.1]),
             "beta": np.array([3.0, 3.0, 6.0]), "draw": np.array([0, 1, 2])}
    table = stage.run_batch(batch)
    assert table.schema.equals(SAMPLES_SCHEMA) and table.num_rows == 3
    assert len(table["latent"][0].as_py()) == 4 * 8 * 8  # the SD latent, not the image
    images = decode_images(table["image"].to_pylist(), table["sample_id"].to_pylist(), None)
    assert images.shape == (3, 3, 16, 16)
    p = [json.loads(s) for s in table["params"].to_pylist()]
    assert [(x["alpha"], x["beta"], x["moved"]) for x in p] == [(0.0, 3.0, 0), (0.1, 3.0, 2), (0.1, 6.0, 2)]
    log_p = torch.tensor(np.stack(table["probs"].to_numpy(zero_copy_only=False))).log()
    from genstress_ray.metrics import kldb

    expected = kldb(log_p, class_subset(["chihuahua", "papillon"], SD_CLASSES))
    assert torch.allclose(expected, torch.tensor(table["kldb"].to_numpy()), atol=1e-4)
