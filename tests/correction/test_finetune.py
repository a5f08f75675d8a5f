import math

import numpy as np
import pytest

from genstress_ray.correction import FinetuneSettings, accuracy, evaluate, finetune, selection_score
from genstress_ray.models import load_module


def test_a_large_lambda_fixes_the_planted_region_and_a_tiny_one_leaves_it(planted_data, planted_classifier):
    before, _ = load_module(planted_classifier)
    region_before = accuracy(before, planted_data["region_test_x"], planted_data["region_test_y"])
    assert region_before < 0.3
    results = {}
    for lam in (1e-10, 1.0, 100.0):
        model, _ = load_module(planted_classifier)
        finetune(model, planted_data, "finetune", FinetuneSettings(lam=lam, epochs=4, lr=1e-3, batch_size=64))
        results[lam] = evaluate(model, planted_data)
    assert results[1e-10]["region_test_acc"] < 0.3
    assert results[1.0]["region_test_acc"] > 0.9
    # The paper's trade-off: a moderate lambda keeps most of the test set, a huge one trades it away.
    assert results[1.0]["test_acc"] > 0.7
    assert results[100.0]["region_test_acc"] > 0.9
    assert results[100.0]["test_acc"] < results[1.0]["test_acc"]


def test_selection_prefers_the_fixed_model_when_combined_and_plain_accuracy_otherwise():
    fixed = {"val_acc": 0.93, "region_val_acc": 0.95}
    untouched = {"val_acc": 0.95, "region_val_acc": 0.10}
    assert selection_score(fixed, "combined") > selection_score(untouched, "combined")
    assert selection_score(fixed, "validation") < selection_score(untouched, "validation")
    assert selection_score({"val_acc": 0.9, "region_val_acc": math.nan}, "combined") == 0.9


def test_real_region_selection_uses_the_real_members_and_falls_back_to_combined():
    generated_only = {"val_acc": 0.9, "region_val_acc": 1.0, "real_region_val_acc": 0.3}
    transfers = {"val_acc": 0.9, "region_val_acc": 0.8, "real_region_val_acc": 0.9}
    assert selection_score(generated_only, "combined") > selection_score(transfers, "combined")
    assert selection_score(generated_only, "real_region") < selection_score(transfers, "real_region")
    assert selection_score(transfers, "real_region") == 0.9
    no_real = {"val_acc": 0.9, "region_val_acc": 0.7, "real_region_val_acc": math.nan}
    assert selection_score(no_real, "real_region") == selection_score(no_real, "combined") == 0.8


def test_shards_of_two_ranks_cover_each_d_image_once_per_epoch():
    seen = []
    # The same seed on every rank draws the same permutation; each rank takes its own slice.
    from genstress_ray.correction.finetune import _shard

    order = np.random.default_rng(0).permutation(100)
    for step in range(5):
        for rank in range(2):
            seen.extend(_shard(order, step, rank, 2, 10).tolist())
    assert sorted(seen) == list(range(100))


def test_an_empty_finetune_set_is_refused(planted_data, untrained_model):
    data = {**planted_data, "finetune_x": planted_data["finetune_x"][:0], "finetune_y": planted_data["finetune_y"][:0]}
    with pytest.raises(ValueError, match="finetune set is empty"):
        finetune(untrained_model, data, "finetune", FinetuneSettings(lam=1.0, epochs=1))
