"""LLM counterfactuals as a campaign: tiny random Stable Diffusion + ControlNet, the offline lexicon
writer, digits; through regions, oracle labels, correction, assessment and the report."""

import copy
import json

import numpy as np
import pytest
import torch

from conftest import TINY_CNN
from genstress_ray.cli import main
from genstress_ray.config import ConfigError
from genstress_ray.models import ModelError, ModelRef, get_model, load_generator, save_checkpoint
from genstress_ray.pipeline import run_campaign
from genstress_ray.storage import SAMPLES_SCHEMA, RunStore

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture
def counterfactual_config(tiny_config, tiny_models, tiny_controlnet, tmp_path) -> dict:
    torch.manual_seed(1)  # an oracle that disagrees with the classifier under test: failure regions
    oracle = str(tmp_path / "oracle.safetensors")
    save_checkpoint(get_model("small_cnn", **TINY_CNN), oracle, "small_cnn", TINY_CNN)
    cfg = copy.deepcopy(tiny_config)
    cfg["data"]["search"]["limit"] = 16
    cfg.update(generator={"uri": tiny_controlnet["stable_diffusion"]}, oracle={"uri": oracle},
               strategy={"name": "counterfactual", "controlnet": tiny_controlnet["controlnet"], "per_caption": 2,
                         "steps": 2, "synonyms": {"3": ["three"]}},
               reduce={**cfg["reduce"], "max_dims": 8}, assessment={"detector": {"uri": tiny_models["generator"]}},
               correction={"lambdas": [1.0], "finetune_per_region": 8, "test_per_region": 8, "epochs": 1,
                           "batch_size": 16, "workers": 1, "max_concurrent_trials": 1})
    return cfg


@pytest.mark.slow
def test_a_counterfactual_campaign_runs_through_labels_correction_and_the_report(counterfactual_config, capsys):
    cfg = counterfactual_config
    result = run_campaign(cfg)
    store = RunStore(cfg["output"], cfg["campaign"], result.run_id)
    counts = store.marker("identify")
    # 16 sources x 2 counterfactual texts x 2 images; the offline writer makes no language-model call.
    assert counts["candidates"] == 64 == counts["generator_calls"] and counts["sources"] == 16
    assert counts["counterfactual_texts"] == 32 and counts["llm_calls"] == 0 and counts["rewrites_invalid"] == 0
    samples = store.read_table("identify")
    assert samples.schema.equals(SAMPLES_SCHEMA) and samples.num_rows == counts["faults"] > 0
    assert set(samples["strategy"].to_pylist()) == {"counterfactual"} and all(samples["fault"].to_pylist())
    for row in samples.slice(0, 8).to_pylist():
        p = json.loads(row["params"])
        assert p["caption"] == f"a photo of a {row['source_label']}" and p["text"].startswith(p["caption"])
        assert p["control"] == "canny" and p["edits"][0][0] == "" and 0 <= p["edge_agreement"] <= 1
        assert row["pred"] != row["source_label"] and len(row["latent"]) == 4 * 8 * 8
    # A stored latent decodes (through the run's Stable Diffusion) to the stored image.
    g = load_generator(ModelRef(cfg["generator"]["uri"]), (1, 8, 8), "diffusion_model", 10)
    from genstress_ray.data import decode_images, to_uint8

    first = samples.slice(0, 2)
    decoded = to_uint8(g.decode(torch.tensor(np.stack(first["latent"].to_numpy(zero_copy_only=False)))))
    stored = decode_images(first["image"].to_pylist(), first["sample_id"].to_pylist(), None)
    assert np.abs(decoded.astype(int) - stored).max() <= 2
    # Regions over the latents, samples drawn from them decoded the same way.
    assert result.counts["regions"] >= 1
    assert store.count_rows("region_samples") == result.counts["regions"] * cfg["reduce"]["samples_per_region"]

    assert main(["label", result.run_uri, "--oracle"]) == 0
    labels = store.read_table("labels").to_pylist()
    assert any(lab["is_failure"] for lab in labels if lab["region_id"] is not None)
    assert main(["correct", result.run_uri]) == 0
    assert main(["assess", result.run_uri]) == 0
    a = store.read_json("assessment")
    c = a["counterfactual"]
    assert a["strategy"] == "counterfactual" and c["sources"] == 16 and c["texts"] == 32
    assert np.isnan(a["fault_detection"]["faults_per_llm_call"])  # no language model was called
    assert 0 <= c["fault_edge_agreement"] <= 1 and 0 <= c["flip_rate"] <= 1
    assert 0 <= a["validity"]["oracle_keeps_label"] <= 1 and c["fault_text_diversity"]["distinct_2"] > 0
    assert main(["report", result.run_uri]) == 0
    page = store.fs.cat_file(f"{store.path}/report/index.html").decode()
    assert "faults per language-model call" in page and "made from &ldquo;a photo of a" in page
    assert "id='before-after'" in page
    capsys.readouterr()


def test_a_counterfactual_run_refuses_bad_models_before_any_ray_work(counterfactual_config, tiny_models, tmp_path):
    cfg = copy.deepcopy(counterfactual_config)
    cfg["generator"] = {"uri": tiny_models["diffusion_model"]}  # a pixel DDPM: no Stable Diffusion to condition
    with pytest.raises(ModelError, match="needs a Stable Diffusion folder"):
        run_campaign(cfg)
    cfg = copy.deepcopy(counterfactual_config)
    cfg["strategy"]["controlnet"] = str(tmp_path / "missing")
    with pytest.raises(ModelError, match="missing"):
        run_campaign({**cfg, "run_id": "r2"})
    cfg = copy.deepcopy(counterfactual_config)
    cfg["strategy"]["writer"] = {"name": "chat", "base_url": "http://127.0.0.1:9", "model": "m", "no_such_option": 1}
    with pytest.raises(ModelError, match="strategy.writer: .*no_such_option"):
        run_campaign({**cfg, "run_id": "r3"})
    with pytest.raises(ConfigError, match="strategy.counterfactual.control: unknown control image kind 'hed'"):
        run_campaign({**counterfactual_config, "strategy": {**counterfactual_config["strategy"], "control": "hed"}})
