import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY_CNN, TINY_VAE
from genstress_ray.models import (Classifier, LatentGenerator, ModelError, cache_key, get_model, list_models,
                                  load_module, model_kind, save_checkpoint, train_classifier)
from genstress_ray.data import get_source

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # makes tests.models.factories importable
NAMES = [str(i) for i in range(10)]


def _classifiers(tmp_path):
    """Every way a classifier can enter: built-in, TorchScript file, state dict + factory."""
    torch.manual_seed(0)
    cnn = get_model("small_cnn", **TINY_CNN).eval()
    script = tmp_path / "cnn.pt"
    torch.jit.save(torch.jit.script(cnn), str(script))
    state = tmp_path / "mlp.pth"
    torch.manual_seed(0)
    torch.save(get_model_from_factory().state_dict(), state)
    return {
        "builtin": cnn,
        "torchscript": load_module(str(script))[0],
        "factory": load_module(str(state), factory="tests.models.factories:tiny_mlp")[0],
    }


def get_model_from_factory():
    from tests.models.factories import tiny_mlp

    return tiny_mlp()


@pytest.mark.parametrize("kind", ["builtin", "torchscript", "factory"])
def test_classifier_contract(kind, tmp_path):
    """Shared contract: images (N, C, H, W) in [0, 1] -> finite logits (N, classes), batch-independent."""
    clf = Classifier(_classifiers(tmp_path)[kind], NAMES, (1, 8, 8)).eval()
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = clf(x)
        one = clf(x[:1])
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()
    torch.testing.assert_close(one, logits[:1], rtol=1e-4, atol=1e-5)


def test_classifier_with_the_wrong_class_count_or_shape_is_rejected():
    net = get_model("small_cnn", **{**TINY_CNN, "num_classes": 3})
    with pytest.raises(ModelError, match="3,\\) outputs per image but the dataset has 10 classes"):
        Classifier(net, NAMES, (1, 8, 8))
    with pytest.raises(ModelError, match="does not accept images of shape \\(3, 8, 8\\)"):
        Classifier(get_model("small_cnn", **TINY_CNN), NAMES, (3, 8, 8))


@pytest.mark.parametrize("arch", list_models("latent_generator"))
def test_latent_generator_contract(arch):
    """Shared contract: encode -> (mean, log_var) of one size, decode -> images in [0, 1] of the input shape."""
    gen = LatentGenerator(get_model(arch, **TINY_VAE), (1, 8, 8)).eval()
    with torch.no_grad():
        mean, log_var = gen.encode(torch.rand(3, 1, 8, 8))
        images = gen.decode(mean + torch.randn_like(mean))
    assert mean.shape == log_var.shape == (3, gen.latent_dim)
    assert images.shape == (3, 1, 8, 8) and 0 <= float(images.min()) and float(images.max()) <= 1


def test_latent_generator_without_the_protocol_methods_is_rejected():
    with pytest.raises(ModelError, match="has no encode\\(\\) method"):
        LatentGenerator(nn.Linear(2, 2), (1, 8, 8))


def test_registry_kinds():
    assert model_kind("small_cnn") == "classifier" and model_kind("beta_vae") == "latent_generator"
    with pytest.raises(ModelError, match="unknown architecture 'resnet'"):
        get_model("resnet")


def test_safetensors_round_trip_rebuilds_from_metadata(tmp_path):
    torch.manual_seed(3)
    vae = get_model("beta_vae", **TINY_VAE).eval()
    uri = str(tmp_path / "sub" / "vae.safetensors")
    save_checkpoint(vae, uri, "beta_vae", TINY_VAE, extra={"note": "x"})
    loaded, meta = load_module(uri)
    assert meta["architecture"] == "beta_vae" and meta["note"] == "x"
    z = torch.randn(2, TINY_VAE["latent_dim"])
    torch.testing.assert_close(loaded.decode(z), vae.decode(z))


def test_a_checkpoint_for_another_architecture_fails_with_a_clear_error(tmp_path):
    uri = str(tmp_path / "cnn.safetensors")
    save_checkpoint(get_model("small_cnn", **TINY_CNN), uri, "small_cnn", TINY_CNN)
    with pytest.raises(ModelError, match="does not match architecture small_cnn"):
        load_module(uri, params={"width": 8})


def test_state_dict_loading_never_unpickles_arbitrary_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"w": Evil()}, path)
    with pytest.raises(ModelError, match="read as state_dict failed"):
        load_module(str(path), architecture="small_cnn", params=TINY_CNN)


def test_unreadable_checkpoint_names_the_uri(tmp_path):
    with pytest.raises(ModelError, match="missing.safetensors"):
        load_module(str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.safetensors.*not a model checkpoint"):
        load_module(str(tmp_path / "junk.safetensors"))


def test_a_text_file_as_checkpoint_says_what_was_tried_and_what_the_file_is(tmp_path):
    (tmp_path / "notes.pt").write_text("my model notes\n")
    with pytest.raises(ModelError, match=r"notes.pt' is not a model checkpoint \(format auto: read as state_dict "
                                         r"failed.*it is a text file of 15 bytes. Formats: TorchScript") as err:
        load_module(str(tmp_path / "notes.pt"))
    assert "notes\n" not in str(err.value) and "model notes" not in str(err.value)  # never the contents (a secret?)


def test_format_auto_recognises_a_large_torchscript_archive(tmp_path):
    """TorchScript's constants.pkl sits behind the tensors: in a model of size, past the first 64 KB."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2048), torch.nn.Linear(2048, 10)).eval()
    path = tmp_path / "big.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    assert path.stat().st_size > 500_000
    module, _ = load_module(str(path))
    x = torch.rand(2, 1, 8, 8)
    assert isinstance(module, torch.jit.ScriptModule) and torch.allclose(module(x), net(x))


def test_cache_key_depends_on_every_part_of_the_recipe():
    recipe = {"architecture": "small_cnn", "train": {"epochs": 3}, "data": {"kind": "digits"}}
    assert cache_key("classifier", recipe) == cache_key("classifier", dict(recipe))
    assert cache_key("classifier", recipe) != cache_key("classifier", {**recipe, "train": {"epochs": 4}})


def test_training_the_small_cnn_on_digits_beats_chance_by_far():
    train = get_source("digits", split="train").load()
    val = get_source("digits", split="validation").load()
    _, metrics = train_classifier(train, val, epochs=12)
    assert metrics["val_acc"] > 0.9


def test_a_trained_model_does_not_depend_on_the_callers_thread_count(tmp_path):
    """Weights depend on torch's thread count (reductions sum in another order); training sets it, so
    a machine with more cores, or a caller that changed it, trains the same model."""
    from genstress_ray.data import get_source
    from genstress_ray.models import train_and_save

    train = get_source("digits", split="train", limit=256).load()
    weights = []
    for i, outer in enumerate((4, 1)):
        torch.set_num_threads(outer)
        train_and_save("latent_generator", "beta_vae", train, None, str(tmp_path / f"v{i}.safetensors"),
                       {"latent_dim": 4, "width": 8, "hidden": 32}, {"epochs": 2})
        weights.append(load_module(str(tmp_path / f"v{i}.safetensors"))[0].state_dict())
        assert torch.get_num_threads() == outer  # restored
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_registries_refuse_a_name_twice_and_list_what_is_registered():
    from genstress_ray.data import DigitsSource, register_source
    from genstress_ray.models import register_model

    with pytest.raises(ValueError, match=r"architecture 'small_cnn' is already registered \(registered: .*beta_vae"):
        register_model("small_cnn", "classifier")(lambda **p: None)
    with pytest.raises(ValueError, match=r"dataset kind 'digits' is already registered \(registered: .*mnist"):
        register_source(DigitsSource)


def test_a_generator_pickle_is_refused_without_advice_to_load_it_unsafely(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "generator.pkl"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ModelError, match="generator.pkl.*pickled Python objects besides tensors") as err:
        load_module(str(path), architecture="beta_vae", params={"in_shape": [1, 8, 8], "latent_dim": 4})
    assert "weights_only" not in str(err.value).replace("(weights only)", "")
