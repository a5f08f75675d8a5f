"""Shared fixtures: one local Ray cluster, a real S3 API server on loopback, tiny random models."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from genstress_ray.data import get_source
from genstress_ray.models import get_model, save_checkpoint
from genstress_ray.models.training import train_classifier

from browser import CHROMIUM, FLAGS

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(not (SHARED_DATA / "mnist").exists(),
                                       reason=f"real MNIST files not found at {SHARED_DATA}")
TINY_CNN = {"in_shape": [1, 8, 8], "num_classes": 10, "width": 4, "hidden": 16}
TINY_VAE = {"in_shape": [1, 8, 8], "latent_dim": 4, "width": 4, "hidden": 16}
TINY_DDPM = {"in_shape": [1, 8, 8], "num_classes": 10, "channels": [8, 16], "norm_num_groups": 4}
TINY_STYLEGAN = {"in_shape": [1, 8, 8], "num_classes": 10, "z_dim": 8, "w_dim": 8, "mapping_layers": 2,
                 "channels": [8, 8, 8]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto in server mode on 127.0.0.1, reached through s3fs/pyarrow like a user's bucket.

    Session-scoped and started before Ray, so Ray's worker processes inherit the credentials.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket per test; returns its s3:// URI."""
    import s3fs

    name = "test-" + request.node.name.lower().replace("_", "-")[:40].strip("-[]")
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    if not fs.exists(name):
        fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024 ** 2,
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Random-weight tiny CNN, beta-VAE, style-based GAN and class-conditional DDPM for 8x8 digits, as self-describing safetensors."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    paths = {}
    for role, arch, params in (("classifier", "small_cnn", TINY_CNN), ("generator", "beta_vae", TINY_VAE),
                               ("style_generator", "small_stylegan", TINY_STYLEGAN),
                               ("diffusion_model", "small_ddpm", TINY_DDPM)):
        paths[role] = str(root / f"{role}.safetensors")
        save_checkpoint(get_model(arch, **params), paths[role], arch, params)
    return paths


@pytest.fixture(scope="session")
def tiny_controlnet(tmp_path_factory) -> dict[str, str]:
    """Random-weight tiny Stable Diffusion (16x16 images from 4x8x8 latents) and a Canny ControlNet for
    it, in diffusers folder layout, for the counterfactual strategy."""
    from models.factories import write_tiny_controlnet, write_tiny_stable_diffusion

    root = tmp_path_factory.mktemp("controlnet")
    write_tiny_stable_diffusion(root / "sd", words=("a", "photo", "of", "digit", "red", "blue", "at", "night",
                                                    "in", "snow", "the", "fog"))
    write_tiny_controlnet(root / "sd", root / "canny")
    return {"stable_diffusion": str(root / "sd"), "controlnet": str(root / "canny")}


@pytest.fixture
def tiny_config(tiny_models, tmp_path) -> dict:
    """A small digits campaign on the tiny models; finishes in seconds."""
    return {
        "campaign": "test",
        "output": str(tmp_path / "runs"),
        "run_id": "r1",
        "cache": str(tmp_path / "cache"),
        # Half the test split is searched, the other half held out (config.DataSpec.share).
        "data": {"search": {"kind": "digits", "split": "test", "limit": 48, "share": [0.0, 0.5]}},
        # Random weights: the VAE's reconstructions are noise to the classifier.
        "checks": {"accept_low_fidelity": True},
        "classifier": {"uri": tiny_models["classifier"]},
        "generator": {"uri": tiny_models["generator"]},
        # The reference code's settings (large uncentred noise, every image searched): random models
        # then give faults enough for regions.
        "strategy": {"name": "defuse", "preset": "reference", "a": 1.0, "b": 1.0, "draws": 8,
                     "max_faults_per_image": 3},
        "reduce": {"max_components": 10, "samples_per_region": 4, "max_iter": 100},
        "resources": {"search": {"actors": 1, "num_cpus": 0.5, "batch_size": 16},
                      "region_samples": {"actors": 1, "num_cpus": 0.5, "batch_size": 16}},
    }


@pytest.fixture(scope="session")
def style_classifier(tiny_models, tmp_path_factory) -> str:
    """A tiny CNN trained to tell the tiny random style GAN's classes apart, so that seeds are
    classified correctly and mixing toward other classes flips labels."""
    from genstress_ray.data import ImageSet, to_uint8
    from genstress_ray.models import StyleGenerator, load_module

    g = StyleGenerator(load_module(tiny_models["style_generator"])[0], (1, 8, 8), 10).eval()
    labels = torch.arange(10).repeat(200)
    with torch.no_grad():
        z = torch.randn(len(labels), g.z_dim, generator=torch.Generator().manual_seed(0))
        images = to_uint8(g.synthesis(g.mapping(z, g.one_hot(labels))))
    data = ImageSet(images, labels.numpy(), [str(i) for i in range(len(labels))], [str(i) for i in range(10)])
    model, _ = train_classifier(data, architecture="small_cnn", params={"width": 8, "hidden": 32}, epochs=8)
    path = str(tmp_path_factory.mktemp("style") / "classifier.safetensors")
    save_checkpoint(model, path, "small_cnn", {**TINY_CNN, "width": 8, "hidden": 32})
    return path


@pytest.fixture
def style_config(tiny_config, tiny_models, style_classifier) -> dict:
    """The tiny campaign with the tiny style-based GAN, a classifier that knows its classes, and
    latent code mixing."""
    return {**tiny_config, "classifier": {"uri": style_classifier},
            "generator": {"uri": tiny_models["style_generator"]},
            "strategy": {"name": "mixing", "seeds": 24, "budget_calls": 40, "tolerance": 0.01}}


# One Playwright instance per session: a second sync_playwright() in the same process is refused.
@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    yield page
    context.close()


# ---- a planted failure region for the correction tests --------------------------------------
# Digits with a bright corner patch whose true class is 0.
#
# A classifier trained on plain digits calls them by their digit, so it gets the region about 10%
# right; fine-tuning with the region in Df must teach it the patch.
PLANTED_CLASS = 0


def _with_patch(images: np.ndarray) -> np.ndarray:
    out = images.copy()
    out[:, :, :3, :3] = 255
    return out


@pytest.fixture(scope="session")
def planted_data() -> dict[str, np.ndarray]:
    train = get_source("digits", split="train").load()
    val = get_source("digits", split="validation").load()
    test = get_source("digits", split="test").load()
    data = {"train_x": train.images, "train_y": train.labels.astype(np.int64),
            "val_x": val.images, "val_y": val.labels.astype(np.int64),
            "test_x": test.images, "test_y": test.labels.astype(np.int64)}
    for name, source in (("finetune", train), ("region_val", val), ("region_test", test)):
        # Only digits other than 0: for them the patch is the whole story.
        keep = source.labels != PLANTED_CLASS
        data[f"{name}_x"] = _with_patch(source.images[keep])
        data[f"{name}_y"] = np.full(int(keep.sum()), PLANTED_CLASS, np.int64)
    return data


@pytest.fixture(scope="session")
def planted_classifier(tmp_path_factory) -> str:
    """A tiny CNN trained on plain digits (a few seconds), saved as safetensors."""
    train = get_source("digits", split="train").load()
    model, _ = train_classifier(train, None, "small_cnn", {**TINY_CNN, "width": 8, "hidden": 32}, epochs=15,
                                lr=3e-3, seed=0)
    path = str(tmp_path_factory.mktemp("planted") / "classifier.safetensors")
    save_checkpoint(model, path, "small_cnn", {**TINY_CNN, "width": 8, "hidden": 32})
    return path


@pytest.fixture
def untrained_model():
    return get_model("small_cnn", **TINY_CNN)


@pytest.fixture
def labelled_run(tiny_config, ray_cluster):
    """The tiny campaign, run, with region 0 labelled a failure of class 3, region 1 fine, and six
    faults labelled one by one (for the baseline)."""
    from genstress_ray.labeling import labels_table, write_labels
    from genstress_ray.pipeline import run_campaign
    from genstress_ray.storage import RunStore

    tiny_config["correction"] = {"lambdas": [1e-10, 10.0], "finetune_per_region": 20, "test_per_region": 10,
                                 "epochs": 1, "batch_size": 32, "workers": 1, "max_concurrent_trials": 2}
    result = run_campaign(tiny_config)
    store = RunStore.from_uri(result.run_uri)
    assert result.counts["regions"] >= 2
    faults = store.read_table("identify", columns=["sample_id"]).to_pylist()[:6]
    write_labels(store, labels_table(
        [{"region_id": 0, "label": "3", "is_failure": True, "source": "human"},
         {"region_id": 1, "label": "not a failure", "is_failure": False, "source": "human"}]
        + [{"sample_id": f["sample_id"], "label": "5", "is_failure": True, "source": "oracle"} for f in faults]),
        [str(i) for i in range(10)])
    return store
