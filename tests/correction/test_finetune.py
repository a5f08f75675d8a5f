import math

import numpy as np
import pytest

from genstress_ray.correction import FinetuneSettings, array_batches, finetune, rate, score, selection_score
from genstress_ray.models import load_module
from genstress_ray.models.training import images_accuracy as accuracy


def _finetuned(path, data, lam):
    model, _ = load_module(path)
    return finetune(model, array_batches(data["train_x"], data["train_y"], 64, 0), data["finetune_x"],
                    data["finetune_y"], FinetuneSettings(lam=lam, epochs=4, lr=1e-3, batch_size=64))


def test_a_large_lambda_fixes_the_planted_region_and_a_tiny_one_leaves_it(planted_data, planted_classifier):
    before, _ = load_module(planted_classifier)
    region_before = accuracy(before, planted_data["region_test_x"], planted_data["region_test_y"])
    assert region_before < 0.3
    results = {}
    for lam in (1e-10, 1.0, 100.0):
        model = _finetuned(planted_classifier, planted_data, lam)
        results[lam] = {name: accuracy(model, planted_data[f"{name}_x"], planted_data[f"{name}_y"])
                        for name in ("test", "region_test")}
    assert results[1e-10]["region_test"] < 0.3
    assert results[1.0]["region_test"] > 0.9
    # The paper's trade-off: a moderate lambda keeps most of the test set, a huge one trades it away.
    assert results[1.0]["test"] > 0.7
    assert results[100.0]["region_test"] > 0.9
    assert results[100.0]["test"] < results[1.0]["test"]


def test_score_counts_per_region_and_adds_up_over_batches(planted_data, planted_classifier):
    model, _ = load_module(planted_classifier)
    x, y = planted_data["test_x"], planted_data["test_y"]
    region = np.arange(len(y)) % 3 - 1  # regions -1 (none), 0 and 1
    target = np.where(region == 0, 3, np.where(region == 1, 8, -1))  # the regions' labels: 3 and 8
    whole = score(model, [(x, y, region, target)])
    pieces = score(model, [(x[i: i + 50], y[i: i + 50], region[i: i + 50], target[i: i + 50])
                           for i in range(0, len(y), 50)])
    assert whole == pieces and whole["n"] == len(y)
    assert rate(whole) == pytest.approx(accuracy(model, x, y))
    def count(mask):
        return [round(accuracy(model, x[mask], y[mask]) * mask.sum()), int(mask.sum())]

    for rid, label in ((0, 3), (1, 8)):
        inside = region == rid
        assert whole["regions"][str(rid)] == count(inside)
        # Each member against its own label: those of the region's label are its subgroup, the rest collateral.
        assert whole["subgroup"][str(rid)] == count(inside & (y == label))
        assert whole["collateral"][str(rid)] == count(inside & (y != label))
    assert set(whole["regions"]) == {"0", "1"} and math.isnan(rate(score(model, [])))
    assert score(model, [(x, y, None, None)])["subgroup"] == {}


def test_selection_prefers_the_fixed_model_when_combined_and_plain_accuracy_otherwise():
    fixed = {"val_acc": 0.93, "region_val_acc": 0.95}
    untouched = {"val_acc": 0.95, "region_val_acc": 0.10}
    assert selection_score(fixed, "combined") > selection_score(untouched, "combined")
    assert selection_score(fixed, "validation") < selection_score(untouched, "validation")
    assert selection_score({"val_acc": 0.9, "region_val_acc": math.nan}, "combined") == 0.9


def test_real_region_selection_uses_the_real_members_and_falls_back_to_combined():
    generated_only = {"val_acc": 0.9, "region_val_acc": 1.0, "real_members_val_acc": 0.3}
    transfers = {"val_acc": 0.9, "region_val_acc": 0.8, "real_members_val_acc": 0.9}
    assert selection_score(generated_only, "combined") > selection_score(transfers, "combined")
    assert selection_score(generated_only, "real_region") < selection_score(transfers, "real_region")
    assert selection_score(transfers, "real_region") == 0.9
    no_real = {"val_acc": 0.9, "region_val_acc": 0.7, "real_members_val_acc": math.nan}
    assert selection_score(no_real, "real_region") == selection_score(no_real, "combined") == 0.8


def test_array_batches_cover_each_image_once_per_epoch_in_a_new_order():
    x, y = np.zeros((100, 1, 2, 2), np.uint8), np.arange(100)
    epochs = array_batches(x, y, 10, seed=0)
    first, second = [np.concatenate([b[1] for b in epochs(e)]) for e in (0, 1)]
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(100))
    assert first.tolist() != second.tolist()
    assert list(epochs(0))[0][1].tolist() == first[:10].tolist()  # the same epoch, the same order


def test_an_empty_finetune_set_is_refused(planted_data, untrained_model):
    with pytest.raises(ValueError, match="fine-tune set is empty"):
        finetune(untrained_model, array_batches(planted_data["train_x"], planted_data["train_y"], 64, 0),
                 planted_data["finetune_x"][:0], planted_data["finetune_y"][:0], FinetuneSettings(lam=1.0, epochs=1))
