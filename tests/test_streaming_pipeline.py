"""A campaign over a streaming source with the models users already have: an image folder of RGB JPEGs
at one size, a transformers classifier at another, a diffusers AutoencoderKL at a third."""

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genstress_ray.pipeline import run_campaign
from genstress_ray.storage import SHARD_MADE_BY, RunStore, read_shard_counts

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.models.factories
from tests.models.factories import write_tiny_autoencoder_kl, write_tiny_transformers_classifier  # noqa: E402

CLASSES = ["stop", "yield"]


@pytest.fixture
def sign_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (tmp_path / "signs" / name).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(80 + 90 * c, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG")
            (tmp_path / "signs" / name / f"{i:02d}.jpg").write_bytes(buf.getvalue())
    (tmp_path / "signs" / "stop" / "99-truncated.jpg").write_bytes(buf.getvalue()[:40])
    return tmp_path / "signs"


def test_a_campaign_streams_an_image_folder_through_a_transformers_classifier_and_an_sd_vae(
        sign_folder, tmp_path, ray_cluster):
    write_tiny_transformers_classifier(tmp_path / "resnet", CLASSES, "resnet", side=32)
    write_tiny_autoencoder_kl(tmp_path / "vae", channels=3, side=16)
    cfg = {"campaign": "signs", "output": str(tmp_path / "runs"), "run_id": "r1", "shard_rows": 8,
           # Every image is searched (the folder's train split, test and validation empty): no evaluation here.
           "data": {"search": {"kind": "image_folder", "uri": str(sign_folder), "split": "train", "test_fraction": 0.0,
                               "validation_fraction": 0.0}},
           "checks": {"accept_low_fidelity": True},  # random weights
           "classifier": {"uri": str(tmp_path / "resnet")}, "generator": {"uri": str(tmp_path / "vae")},
           "strategy": {"name": "defuse", "preset": "reference", "a": 2.0, "b": 2.0, "draws": 3, "keep": "all"},
           "reduce": {"max_components": 4, "samples_per_region": 2, "max_iter": 50, "max_dims": 8},
           "resources": {"search": {"actors": 1, "num_cpus": 0.5, "batch_size": 4},
                         "region_samples": {"actors": 1, "num_cpus": 0.5, "batch_size": 4}}}
    result = run_campaign(cfg)
    store = RunStore.from_uri(result.run_uri)
    info = store.marker("identify")
    assert info["shards"] == 4 and info["unreadable"] == 1 and "stop/99-truncated.jpg" in info["unreadable_first"][0]
    assert "skipped 1 unreadable image(s): stop/99-truncated.jpg" in result.summary()
    assert info["candidates"] == 24 * 3 and store.count_rows("identify") == 24 * 3
    rows = store.read_table("identify", columns=["latent", "image", "source_id"])
    assert len(rows["latent"][0].as_py()) == 2 * 8 * 8  # the AutoencoderKL's latent, flattened
    assert Image.open(io.BytesIO(rows["image"][0].as_py())).size == (24, 24)  # decodes at the data's size
    made_by = [read_shard_counts(store.fs, p, SHARD_MADE_BY) for p in store.shard_files("identify").values()]
    assert all(m["device"] == "cpu" and m["seconds"] >= 0 for m in made_by)
    assert store.is_complete("region_samples")
