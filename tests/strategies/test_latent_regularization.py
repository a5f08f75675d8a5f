"""Truncation and latent code mixing as plain torch functions."""

import pytest
import torch

from genstress_ray.strategies import (boundary_search, clip_codes, default_layer_sets, layer_masks, mix_styles,
                                      runner_up_classes, seed_codes, truncate, truncation_plan)


def test_truncation_is_identity_at_psi_1_and_the_average_at_psi_0():
    rng = torch.Generator().manual_seed(0)
    ws = torch.randn(5, 7, 8, generator=rng)
    w_avg = torch.randn(8, generator=rng)
    assert torch.equal(truncate(ws, w_avg, 1.0), ws)
    assert torch.allclose(truncate(ws, w_avg, 0.0), w_avg.expand_as(ws))
    # One psi per row.
    psi = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5])
    out = truncate(ws, w_avg, psi)
    assert torch.equal(out[0], ws[0]) and torch.allclose(out[1], w_avg.expand(7, 8))
    assert torch.allclose(out[4], (ws[4] + w_avg) / 2, atol=1e-6)


def test_clipping_bounds_each_row_and_inf_leaves_it():
    z = torch.tensor([[3.0, -4.0, 0.5], [3.0, -4.0, 0.5]])
    out = clip_codes(z, torch.tensor([1.0, float("inf")]))
    assert out[0].tolist() == [1.0, -1.0, 0.5]
    assert torch.equal(out[1], z[1])


def test_truncation_plan_cycles_the_schedule_and_is_deterministic():
    psi, bound = truncation_plan(["seed:0", "seed:1"], 8, [1.0, 0.75, 0.5], (1.0, 2.0), 0.5, seed=3)
    assert psi[0].tolist() == [1.0, 0.75, 0.5, 1.0, 0.75, 0.5, 1.0, 0.75]
    clipped = torch.isfinite(bound)
    assert clipped.any() and (~clipped).any()
    assert ((bound[clipped] >= 1.0) & (bound[clipped] <= 2.0)).all()
    again = truncation_plan(["seed:1"], 8, [1.0, 0.75, 0.5], (1.0, 2.0), 0.5, seed=3)[1]
    assert torch.equal(again[0], bound[1])  # a seed's draws do not depend on the other seeds
    assert torch.isinf(truncation_plan(["seed:0"], 4, [1.0], None, 0.5, seed=0)[1]).all()


def test_seed_codes_depend_only_on_the_seed_id():
    a = seed_codes(["seed:0", "seed:1"], 6, 3, seed=0)
    b = seed_codes(["seed:1"], 6, 3, seed=0)
    assert a.shape == (2, 3, 6) and torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])


def test_mixing_identical_codes_or_weight_zero_changes_nothing():
    rng = torch.Generator().manual_seed(0)
    seed_ws, target_ws = torch.randn(4, 7, 8, generator=rng), torch.randn(4, 7, 8, generator=rng)
    masks = layer_masks([[0], [2, 3], [4, 5, 6], [0, 1, 2, 3, 4, 5, 6]], 7)
    assert torch.equal(mix_styles(seed_ws, seed_ws.clone(), masks, torch.ones(4)), seed_ws)
    assert torch.equal(mix_styles(seed_ws, target_ws, masks, torch.zeros(4)), seed_ws)
    full = mix_styles(seed_ws, target_ws, masks, torch.ones(4))
    assert torch.equal(full[1, 2:4], target_ws[1, 2:4]) and torch.equal(full[1, :2], seed_ws[1, :2])
    assert torch.equal(full[3], target_ws[3])


def test_layer_sets_outside_num_ws_are_refused():
    with pytest.raises(ValueError, match=r"layer_sets\[1\].*0\.\.6.*num_ws = 7"):
        layer_masks([[0], [7]], 7)
    with pytest.raises(ValueError, match="cannot be empty"):
        layer_masks([[]], 7)
    assert default_layer_sets(7) == [[0], [1], [2], [3], [4], [5], [6], [0, 1], [2, 3], [4, 5, 6]]


def test_runner_up_classes_skip_the_intended_one():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0], [0.0, 1.0, 9.0, 2.0]])
    assert runner_up_classes(logits, torch.tensor([0, 1]), 2).tolist() == [[1, 2], [2, 3]]


def test_binary_search_converges_on_a_1d_boundary_within_tolerance_and_cap():
    boundaries = torch.tensor([0.3, 0.71, 0.05, 2.0])  # the last never flips, even at weight 1
    calls = []

    def probe(weights, idx):
        calls.append(len(idx))
        return weights > boundaries[idx]

    out = boundary_search(probe, torch.arange(4), torch.full((4,), 100), max_iterations=20, tolerance=1e-3)
    flipped = out.flipped
    assert flipped.tolist() == [True, True, True, False]
    for i in range(3):
        assert out.lower[i] <= boundaries[i] < out.weight[i]
        assert out.weight[i] - out.lower[i] <= 1e-3
        assert out.iterations[i] == 10  # ceil(log2(1 / 1e-3))
    assert out.stop == ["tolerance"] * 3 + ["no_flip"]
    assert out.calls.tolist() == [11, 11, 11, 1]

    capped = boundary_search(probe, torch.arange(4), torch.full((4,), 100), max_iterations=4, tolerance=1e-6)
    assert capped.iterations[:3].tolist() == [4, 4, 4] and capped.stop[:3] == ["max_iterations"] * 3
    assert ((capped.weight[:3] - capped.lower[:3]) == 1 / 16).all()
    assert (capped.lower[:3] <= boundaries[:3]).all() and (boundaries[:3] < capped.weight[:3]).all()


def test_binary_search_respects_each_seeds_call_budget():
    boundaries = torch.full((6,), 0.4)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    out = boundary_search(lambda w, i: w > boundaries[i], groups, torch.tensor([2, 12]), tolerance=1e-3)
    # Seed 0 pays for two probes and nothing more; its third search is never probed.
    assert out.probed.tolist() == [True, True, False, True, True, True]
    assert out.stop[:3] == ["budget", "budget", "not_probed"]
    assert out.calls.tolist() == [2, 12]
    assert out.iterations[3:].sum() == 9


def test_binary_search_stops_on_its_seconds_budget():
    out = boundary_search(lambda w, i: w > 0.5, torch.zeros(3, dtype=torch.long), torch.tensor([100]),
                          tolerance=1e-9, seconds=0.0)
    assert out.flipped.all() and out.stop == ["seconds"] * 3 and (out.iterations == 0).all()
