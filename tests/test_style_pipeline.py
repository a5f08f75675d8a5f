"""Random truncation and latent code mixing as Ray Data stages, through regions and assessment."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genstress_ray.config import ConfigError
from genstress_ray.data import decode_images, to_float
from genstress_ray.labeling import LabelError, flagged_regions
from conftest import TINY_STYLEGAN
from genstress_ray.models import ModelError, ModelRef, get_model, load_classifier, load_generator, save_checkpoint
from genstress_ray.pipeline import run_campaign
from genstress_ray.storage import SAMPLES_SCHEMA, RunStore
from genstress_ray.strategies import seed_codes

pytestmark = pytest.mark.usefixtures("ray_cluster")
NAMES = [str(i) for i in range(10)]


def _store(result, cfg):
    return RunStore(cfg["output"], cfg["campaign"], result.run_id)


def _recompute(cfg, samples):
    """Decode each row's latent with the run's generator and classify it again."""
    g = load_generator(ModelRef(cfg["generator"]["uri"]), (1, 8, 8), "style_generator", 10)
    clf = load_classifier(ModelRef(cfg["classifier"]["uri"]), NAMES, (1, 8, 8))
    latents = torch.tensor(np.stack(samples["latent"].to_numpy(zero_copy_only=False)))
    with torch.no_grad():
        images = g.decode(latents)
        return images, clf(images).argmax(1)


def test_mixing_finds_boundary_faults_that_recompute_and_record_their_search(style_config):
    result = run_campaign(style_config, stop_after="identify")
    store = _store(result, style_config)
    samples = store.read_table("identify")
    marker = store.marker("identify")
    assert samples.schema.equals(SAMPLES_SCHEMA) and samples.num_rows == marker["faults"] > 0
    assert all(samples["fault"].to_pylist()) and set(samples["strategy"].to_pylist()) == {"mixing"}
    assert len(set(samples["sample_id"].to_pylist())) == samples.num_rows
    params = [json.loads(p) for p in samples["params"].to_pylist()]
    labels = samples["source_label"].to_pylist()
    for p, label in zip(params, labels):
        assert p["seed_class"] == label and p["target_class"] != label
        assert 0 <= p["lower"] < p["weight"] <= 1 and p["iterations"] <= 20
        if p["stop"] == "tolerance":
            assert p["weight"] - p["lower"] <= 0.01
    # Every seed of class i % 10 with its own stream; the per-seed call budget holds.
    assert {int(s.split(":")[1]) % 10 for s in samples["source_id"].to_pylist()} <= set(range(10))
    assert marker["generator_calls"] <= 24 * 40
    # The stored latent is the boundary image: decoding it gives the stored prediction, a fault.
    images, pred = _recompute(style_config, samples)
    assert pred.tolist() == samples["pred"].to_pylist()
    stored = to_float(decode_images(samples["image"].to_pylist(), samples["sample_id"].to_pylist(), None))
    assert float((stored - images).abs().max()) <= 1 / 255 + 1e-6
    margins = samples["margin"].to_numpy()
    assert np.isfinite(margins).all() and (margins >= 0).all()


def test_truncation_records_psi_and_clip_and_its_faults_disagree_with_the_seed_class(style_config):
    cfg = {**style_config, "strategy": {"name": "truncation", "seeds": 20, "budget_calls": 12,
                                        "psi": [1.0, 0.5, 0.0], "clip_range": [0.5, 1.0]}}
    result = run_campaign(cfg, stop_after="identify")
    store = _store(result, cfg)
    samples = store.read_table("identify")
    assert result.counts["candidates"] == 20 * 12 and store.marker("identify")["generator_calls"] == 240
    assert samples.num_rows == result.counts["faults"] > 0
    params = [json.loads(p) for p in samples["params"].to_pylist()]
    draws = samples["draw"].to_pylist()
    for p, d in zip(params, draws):
        assert p["psi"] == [1.0, 0.5, 0.0][d % 3]
        assert p["clip"] is None or 0.5 <= p["clip"] <= 1.0
    _, pred = _recompute(cfg, samples)
    assert pred.tolist() == samples["pred"].to_pylist()
    assert (pred.numpy() != samples["source_label"].to_numpy()).all()


def test_regions_and_region_samples_run_on_mixing_output(style_config):
    cfg = {**style_config, "strategy": {**style_config["strategy"], "seeds": 60},
           "reduce": {**style_config["reduce"], "max_dims": 8}}
    result = run_campaign(cfg)
    store = _store(result, cfg)
    regions = store.read_table("regions")
    assert result.counts["faults"] >= 2 and regions.num_rows >= 1
    row = regions.to_pylist()[0]
    latent_dim = 7 * 8  # num_ws x w_dim of the tiny GAN
    assert len(row["mean"]) == latent_dim and len(row["basis"]) == 8 * latent_dim and len(row["cov"]) == 64
    samples = store.read_table("region_samples")
    assert samples.num_rows == regions.num_rows * cfg["reduce"]["samples_per_region"]
    assert len(samples["latent"][0].as_py()) == latent_dim
    assert set(samples["strategy"].to_pylist()) == {"mixing"}  # the run's strategy (was "defuse_region")
    # Region samples decode through the style generator's protocol like any latent.
    _, pred = _recompute(cfg, samples)
    assert pred.tolist() == samples["pred"].to_pylist()


def test_bad_style_inputs_fail_early_with_the_field_named(style_config, tiny_models, tmp_path):
    with pytest.raises(ModelError, match=r"layer_sets\[0\] = \[9\].*num_ws = 7"):
        run_campaign({**style_config, "strategy": {"name": "mixing", "layer_sets": [[9]]}})
    with pytest.raises(ConfigError, match="strategy.truncation.psi.0"):
        run_campaign({**style_config, "strategy": {"name": "truncation", "psi": [-0.1]}})
    with pytest.raises(ConfigError, match="strategy.mixing.budget_calls"):
        run_campaign({**style_config, "strategy": {"name": "mixing", "budget_calls": 0}})
    with pytest.raises(ModelError, match="has no mapping"):
        run_campaign({**style_config, "generator": {"uri": tiny_models["generator"]}})
    three_classes = str(tmp_path / "g3.safetensors")
    params = {**TINY_STYLEGAN, "num_classes": 3}
    save_checkpoint(get_model("small_stylegan", **params), three_classes, "small_stylegan", params)
    with pytest.raises(ModelError, match="conditioned on 3 classes but the classifier and dataset have 10"):
        run_campaign({**style_config, "generator": {"uri": three_classes}})
    assert not (tmp_path / "runs" / "test" / "r1" / "identify").exists()  # nothing ran


def test_an_unconditional_user_generator_searches_from_the_classifiers_own_classes(tiny_models, tmp_path):
    """The stage's code path for an unconditional StyleGAN-shaped module (called in-process)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # makes tests.models.factories importable
    from genstress_ray.stages import MixingSearch, TruncationSearch
    from tests.models.factories import user_style_generator

    torch.manual_seed(0)
    path = str(tmp_path / "user_g.pth")
    torch.save(user_style_generator().state_dict(), path)
    refs = {"classifier": ModelRef(tiny_models["classifier"]),
            "generator": ModelRef(path, factory="tests.models.factories:user_style_generator")}
    batch = {"source_id": np.array([f"seed:{i}" for i in range(12)]), "source_label": np.full(12, -1)}
    common = {**refs, "class_names": NAMES, "image_shape": (1, 8, 8), "seed": 0, "generator_kind": "style_generator"}
    mixing = MixingSearch(**common, params={"top_k": 2, "layer_sets": [[0], [1, 2, 3]], "max_iterations": 20,
                                            "tolerance": 0.01, "budget_calls": 30, "budget_seconds": 60,
                                            "target_tries": 8, "keep": "all"})
    table = mixing.run_batch(batch)
    assert table.schema.equals(SAMPLES_SCHEMA)
    g = load_generator(refs["generator"], (1, 8, 8), "style_generator")
    clf = load_classifier(refs["classifier"], NAMES, (1, 8, 8))
    with torch.no_grad():
        z = seed_codes(list(batch["source_id"]), g.z_dim, 1, 0)[:, 0]
        seed_pred = clf(g.synthesis(g.mapping(z, g.one_hot(torch.full((12,), -1))))).argmax(1)
    by_seed = dict(zip(batch["source_id"], seed_pred.tolist()))
    for row in table.to_pylist():
        p = json.loads(row["params"])
        assert p["seed_class"] == row["source_label"] == by_seed[row["source_id"]]
        assert row["fault"] == (row["pred"] != row["source_label"])
    truncation = TruncationSearch(**common, params={"budget_calls": 5, "psi": [1.0, 0.5], "clip_range": None,
                                                    "clip_probability": 0.0, "keep": "all"})
    rows = truncation.run_batch(batch).to_pylist()
    assert len(rows) == 60 and {r["source_label"] for r in rows} <= set(by_seed.values())


@pytest.mark.slow
def test_mixing_output_flows_through_labels_correction_and_report(style_config, style_classifier):
    """The whole loop on latent code mixing: oracle labels, Ray Train correction, the HTML report."""
    from genstress_ray.correction import run_correction
    from genstress_ray.labeling import label_run, write_labels
    from genstress_ray.report import write_report

    cfg = {**style_config, "strategy": {**style_config["strategy"], "seeds": 60},
           "reduce": {**style_config["reduce"], "max_dims": 8},
           "correction": {"lambdas": [1.0], "finetune_per_region": 10, "test_per_region": 10, "epochs": 1,
                          "batch_size": 32, "workers": 0, "baseline": False}}
    result = run_campaign(cfg)
    store = _store(result, cfg)
    # An oracle that disagrees with the classifier everywhere: a random CNN of the same shape.
    oracle = load_classifier(ModelRef(style_config["classifier"]["uri"], params={}), NAMES, (1, 8, 8))
    torch.manual_seed(5)
    for p in oracle.parameters():
        p.data.normal_()
    labels = label_run(store, oracle, rho=0.0, per_region=4, fault_labels=0)
    write_labels(store, labels, NAMES)
    # A random oracle gives one label to most regions: flagged as unsupported, left out of correction,
    # and when every failure label is flagged, correction refuses until the user confirms them.
    labels = store.read_table("labels")
    flagged = sorted(flagged_regions(labels))
    assert flagged
    if len(flagged) == sum(r["is_failure"] for r in labels.to_pylist() if r["region_id"] is not None):
        with pytest.raises(LabelError, match="flagged as unsupported"):
            run_correction(store.uri)
    summary = run_correction(store.uri, {"confirm_flagged": flagged})
    results = json.loads(store.fs.cat_file(f"{store.path}/correction/results.json"))
    assert results["n_failure_regions"] >= 1 and "defuse" in results and summary
    assert store.count_rows("region_sets") == results["n_failure_regions"] * 20
    report = write_report(store)
    html = store.fs.cat_file(report.replace(store.uri, store.path)).decode()
    assert "strategy" in html and "mixing" in html and "before-after" in html
