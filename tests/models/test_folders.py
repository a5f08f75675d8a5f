"""Models users already have: transformers image classifiers and a diffusers AutoencoderKL, from folders."""

import json

import pytest
import torch

from genstress_ray.models import ModelError, ModelRef, load_classifier, load_generator
from genstress_ray.models.protocols import Classifier, InputSpec
from genstress_ray.models.refs import class_index
from tests.models.factories import write_tiny_autoencoder_kl, write_tiny_transformers_classifier

NAMES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def hf_resnet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resnet")
    write_tiny_transformers_classifier(folder, NAMES, "resnet", side=32)
    return folder


def test_a_transformers_folder_loads_with_its_processor_input_and_id2label(hf_resnet):
    clf = load_classifier(ModelRef(str(hf_resnet)), NAMES, (3, 35, 35))
    # ConvNeXt-style processor: shortest edge 32 / crop_pct 0.875 = 36, centre crop 32.
    assert clf.input_spec == InputSpec((3, 32, 32), resize=36, mean=(0.5,) * 3, std=(0.5,) * 3)
    x = torch.rand(4, 3, 35, 35)
    expected = clf.net(((torch.nn.functional.interpolate(x, size=(36, 36), mode="bilinear", antialias=True)
                         [..., 2:34, 2:34]) - 0.5) / 0.5)
    assert torch.allclose(clf(x), expected, atol=1e-5)


def test_a_classifier_over_more_classes_is_read_for_the_runs_classes_by_name(hf_resnet):
    full = load_classifier(ModelRef(str(hf_resnet)), NAMES, (3, 16, 16))
    subset = load_classifier(ModelRef(str(hf_resnet)), ["fox", "cat"], (3, 16, 16))
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(subset(x), full(x)[:, [2, 0]])
    with pytest.raises(ModelError, match=r"lack 1 of the data's \(wolf\)"):
        load_classifier(ModelRef(str(hf_resnet)), ["cat", "wolf"], (3, 16, 16))


def test_grey_images_feed_an_rgb_vit_and_other_channel_counts_are_refused(tmp_path):
    write_tiny_transformers_classifier(tmp_path / "vit", [f"LABEL_{i}" for i in range(10)], "vit", side=16)
    clf = load_classifier(ModelRef(str(tmp_path / "vit")), [str(i) for i in range(10)], (1, 28, 28))
    assert clf.input_spec.shape == (3, 16, 16) and clf.input_spec.resize is None
    assert clf(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ModelError, match="takes 3-channel images; images of shape \\(4, 28, 28\\) cannot be made"):
        load_classifier(ModelRef(str(tmp_path / "vit")), [str(i) for i in range(10)], (4, 28, 28))


def test_a_declared_input_spec_applies_to_a_plain_checkpoint(tiny_models):
    ref = ModelRef(tiny_models["classifier"], input={"shape": [1, 8, 8], "mean": [0.5], "std": [0.25]})
    clf = load_classifier(ref, [str(i) for i in range(10)], (1, 28, 28))
    x = torch.rand(2, 1, 28, 28)
    small = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", antialias=True)
    assert torch.allclose(clf(x), clf.net((small - 0.5) / 0.25), atol=1e-5)


def test_bad_input_specs_are_named():
    with pytest.raises(ModelError, match="resize 8 is smaller than its crop"):
        InputSpec((3, 16, 16), resize=8)
    with pytest.raises(ModelError, match="mean has 2 values for 3 channels"):
        InputSpec((3, 16, 16), mean=(0.5, 0.5))
    assert class_index(["LABEL_0", "LABEL_1"], ["a", "b"]) is None


def test_a_folder_without_a_preprocessor_config_or_image_size_is_refused(hf_resnet, tmp_path):
    import shutil

    shutil.copytree(hf_resnet, tmp_path / "bare")
    (tmp_path / "bare" / "preprocessor_config.json").unlink()
    with pytest.raises(ModelError, match="no preprocessor_config.json and no image_size"):
        load_classifier(ModelRef(str(tmp_path / "bare")), NAMES, (3, 16, 16))


def test_an_autoencoder_kl_folder_is_a_latent_generator_at_any_data_resolution(tmp_path):
    write_tiny_autoencoder_kl(tmp_path / "vae", channels=3, side=16)
    gen = load_generator(ModelRef(str(tmp_path / "vae")), (3, 35, 35))
    assert gen.latent_dim == 2 * 8 * 8  # latent channels x (16 / 2)^2: two blocks halve once
    x = torch.rand(2, 3, 35, 35)
    with torch.no_grad():
        mean, log_var = gen.encode(x)
        decoded = gen.decode(mean)
    assert mean.shape == log_var.shape == (2, 128) and decoded.shape == (2, 3, 35, 35)
    assert 0 <= float(decoded.min()) and float(decoded.max()) <= 1
    # params.resolution: the VAE works at another side (a multiple of its factor 2).
    assert load_generator(ModelRef(str(tmp_path / "vae"), params={"resolution": 32}), (3, 35, 35)).latent_dim == 512


def test_diffusers_folders_that_are_no_autoencoder_are_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ModelError, match="holds a UNet2DModel; a folder of one model must be an AutoencoderKL"):
        load_generator(ModelRef(str(tmp_path / "unet")), (3, 16, 16))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="folder without config.json"):
        load_generator(ModelRef(str(tmp_path / "empty")), (3, 16, 16))


def test_the_built_in_models_take_odd_image_sides():
    from genstress_ray.models import get_model

    cnn = Classifier(get_model("small_cnn", in_shape=(3, 35, 35), num_classes=43), [str(i) for i in range(43)],
                     (3, 35, 35))
    vae = get_model("beta_vae", in_shape=(3, 35, 35), latent_dim=15)
    x = torch.rand(2, 3, 35, 35)
    assert cnn(x).shape == (2, 43) and vae.decode(vae.encode(x)[0]).shape == (2, 3, 35, 35)


def test_a_built_in_checkpoint_takes_data_of_another_size_resized_to_its_own(tiny_models):
    clf = load_classifier(ModelRef(tiny_models["classifier"]), [str(i) for i in range(10)], (1, 28, 28))
    assert clf.input_spec == InputSpec((1, 8, 8))  # from the checkpoint's params.in_shape
    x = torch.rand(2, 1, 28, 28)
    small = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", antialias=True)
    assert torch.allclose(clf(x), clf.net(small), atol=1e-5)


class _MakesAFolder:
    """A pickle that, if ever unpickled, leaves a folder behind."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


def test_a_transformers_folder_holding_a_pickle_of_objects_is_refused_unread(hf_resnet, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(hf_resnet, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    torch.save({"w": _MakesAFolder(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickled.*holds pickled Python objects besides tensors") as err:
        load_classifier(ModelRef(str(folder)), NAMES, (3, 32, 32))
    assert not marker.exists() and "weights_only` set to `False" not in str(err.value)
