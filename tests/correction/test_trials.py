import pytest
import ray
import torch

from genstress_ray.correction import FinetuneSettings, TrialResources, run_trials, save_finetuned
from genstress_ray.models import ModelRef, load_module
from genstress_ray.models.training import images_accuracy as accuracy

from conftest import TINY_CNN

pytestmark = pytest.mark.usefixtures("ray_cluster")


CLASSES = [str(i) for i in range(10)]
SETS = {"train": "train", "finetune": "finetune", "val": "val", "test": "test", "region_val": "region_val",
        "region_test": "region_test"}


def _datasets(data, **extra):
    """The planted arrays as the Ray Data datasets the trials read (image, label, region columns)."""
    names = {**SETS, **extra}
    return {name: ray.data.from_items([{"image": x, "label": int(y), "region": 0 if name.startswith("region") else -1}
                                       for x, y in zip(data[f"{key}_x"], data[f"{key}_y"])])
            for name, key in names.items()}


def _sweep(data, classifier, methods, lambdas, settings, resources, root, **extra):
    return run_trials(_datasets(data, **extra), ModelRef(classifier), CLASSES, (1, 8, 8), methods, lambdas,
                      settings, resources, root)


def _check_trials(rows, methods, lambdas, planted_data, classifier):
    before, *trials = rows
    # The before row scores the classifier as it is, on every set.
    original, _ = load_module(classifier)
    assert before["method"] == "before" and before["lam"] is None
    for name in ("val", "test", "region_test"):
        assert before[f"{name}_acc"] == pytest.approx(accuracy(original, planted_data[f"{name}_x"],
                                                               planted_data[f"{name}_y"]))
    assert before["scores"]["region_test"]["regions"]["0"][1] == len(planted_data["region_test_y"])
    assert sorted((t["method"], t["lam"]) for t in trials) == sorted((m, lam) for m in methods for lam in lambdas)
    for t in trials:
        for key in ("val_acc", "region_val_acc", "test_acc", "region_test_acc"):
            assert 0.0 <= t[key] <= 1.0
        # The checkpoint on storage is the model the metrics were measured on.
        model, _ = load_module(t["checkpoint"])
        assert accuracy(model, planted_data["region_test_x"], planted_data["region_test_y"]) == \
            pytest.approx(t["region_test_acc"])


def test_sweep_in_ray_train_local_mode(planted_data, planted_classifier, tmp_path):
    rows = _sweep(planted_data, planted_classifier, {"defuse": "finetune"}, [1e-10, 1.0],
                  FinetuneSettings(lam=0, epochs=4, lr=1e-3, batch_size=64),
                  TrialResources(workers=0, num_cpus_per_worker=0.5), str(tmp_path / "trials"))
    _check_trials(rows, ["defuse"], [1e-10, 1.0], planted_data, planted_classifier)
    by_lam = {t["lam"]: t for t in rows[1:]}
    assert by_lam[1e-10]["region_test_acc"] < 0.3 < 0.9 < by_lam[1.0]["region_test_acc"]


def test_sweep_with_two_gloo_workers_per_trial(planted_data, planted_classifier, tmp_path):
    data = {**planted_data, "baseline_x": planted_data["finetune_x"][:50], "baseline_y": planted_data["finetune_y"][:50]}
    rows = _sweep(data, planted_classifier, {"defuse": "finetune", "baseline": "baseline"}, [1.0],
                  FinetuneSettings(lam=0, epochs=4, lr=1e-3, batch_size=32),
                  TrialResources(workers=2, num_cpus_per_worker=0.5), str(tmp_path / "trials"), baseline="baseline")
    _check_trials(rows, ["defuse", "baseline"], [1.0], planted_data, planted_classifier)
    assert {t["method"]: t for t in rows}["defuse"]["region_test_acc"] > 0.9


def test_save_finetuned_keeps_torchscript_as_torchscript(tmp_path, untrained_model):
    scripted = torch.jit.script(untrained_model.eval())
    ref = save_finetuned(scripted, ModelRef("unused"), str(tmp_path / "m.pt"))
    assert ref.format == "torchscript"
    loaded, _ = load_module(ref.uri, ref.format)
    x = torch.rand(3, *TINY_CNN["in_shape"])
    assert torch.allclose(loaded(x), scripted(x))


def test_trial_weights_and_metrics_land_on_s3(planted_data, planted_classifier, s3_bucket):
    """Workers write straight to object storage (moto on loopback), as on a cluster."""
    _, trial = _sweep(planted_data, planted_classifier, {"defuse": "finetune"}, [1.0],
                      FinetuneSettings(lam=0, epochs=1, lr=1e-3, batch_size=64),
                      TrialResources(workers=1, num_cpus_per_worker=0.5), f"{s3_bucket}/run/correction/trials")
    assert trial["checkpoint"] == f"{s3_bucket}/run/correction/trials/defuse-lam00/model.safetensors"
    model, _ = load_module(trial["checkpoint"])
    assert accuracy(model, planted_data["test_x"], planted_data["test_y"]) == pytest.approx(trial["test_acc"])
