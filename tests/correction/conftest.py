"""A planted failure region: digits with a bright corner patch whose true class is 0.

A classifier trained on plain digits calls them by their digit, so it gets the region about 10%
right; fine-tuning with the region in Df must teach it the patch.
"""

import numpy as np
import pytest

from genstress_ray.data import get_source
from genstress_ray.models import get_model, save_checkpoint
from genstress_ray.models.training import train_classifier

from tests.conftest import TINY_CNN

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
