"""LLM counterfactuals as a campaign: tiny random Stable Diffusion + ControlNet, the offline lexicon
writer, digits; through regions, oracle labels, correction, assessment and the report."""

import copy
import json
import re

import numpy as np
import pytest
import torch

from conftest import TINY_CNN
from genstress_ray.cli import main
from genstress_ray.config import ConfigError
from genstress_ray.data import DataError
from genstress_ray.models import ModelError, ModelRef, get_model, load_generator, save_checkpoint
from genstress_ray.pipeline import run_campaign
from genstress_ray.storage import SAMPLES_SCHEMA, RunStore

from counterfactuals.test_writers import ScriptedChat

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture
def counterfactual_config(tiny_config, tiny_models, tiny_controlnet, planted_classifier, tmp_path) -> dict:
    torch.manual_seed(1)  # an oracle that disagrees with the classifier under test: failure regions
    oracle = str(tmp_path / "oracle.safetensors")
    save_checkpoint(get_model("small_cnn", **TINY_CNN), oracle, "small_cnn", TINY_CNN)
    cfg = copy.deepcopy(tiny_config)
    cfg["data"]["search"]["limit"] = 16
    # A trained classifier: sources it gets wrong are skipped, so a random one would leave few.
    cfg.update(classifier={"uri": planted_classifier},
               generator={"uri": tiny_controlnet["stable_diffusion"]}, oracle={"uri": oracle},
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
    # 16 sources, less those the classifier already gets wrong (skipped: nothing to flip), x 2
    # counterfactual texts x 2 images; the offline writer makes no language-model call.
    kept = 16 - counts["sources_misclassified"]
    assert counts["sources"] == 16 and 8 <= kept <= 16
    assert counts["candidates"] == 4 * kept == counts["generator_calls"]
    assert counts["counterfactual_texts"] == 2 * kept and counts["llm_calls"] == 0 and counts["rewrites_invalid"] == 0
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
    assert a["strategy"] == "counterfactual" and c["sources"] == 16 and c["texts"] == 2 * kept
    assert np.isnan(a["fault_detection"]["faults_per_llm_call"])  # no language model was called
    assert 0 <= c["fault_edge_agreement"] <= 1 and 0 <= c["flip_rate"] <= 1
    assert 0 <= a["validity"]["oracle_keeps_label"] <= 1 and c["fault_text_diversity"]["distinct_2"] > 0
    assert main(["report", result.run_uri]) == 0
    page = store.fs.cat_file(f"{store.path}/report/index.html").decode()
    assert "faults per language-model call" in page and "made from &ldquo;a photo of a" in page
    assert "id='before-after'" in page
    capsys.readouterr()


def digit_model(body: dict) -> str:
    """A scripted language model for captions "a photo of a <digit>": for 7 it never answers validly,
    for 1 the first answer of each step is malformed, for the rest every answer is right."""
    messages = body["messages"]
    caption = re.search(r'[Cc]aption:? "([^"]+)"', messages[1]["content"]).group(1)
    digit = caption.split()[-1]
    if digit == "7" or (digit == "1" and len(messages) == 2):
        return "let me think about it"
    prompt = messages[1]["content"]
    if "Which words" in prompt:
        return json.dumps({"words": ["photo", digit]})  # the class is never kept as modifiable
    if "alternatives" in prompt:
        return json.dumps({"alternatives": {"photo": ["painting", digit]}})
    return json.dumps({"captions": [caption.replace("photo", "painting"), caption.replace("photo", "painting") +
                                    " at dusk"]})


@pytest.mark.slow
@pytest.mark.parametrize("processor", [None, {"batch_size": 4}], ids=["in-actors", "llm-processor"])
def test_a_campaign_with_a_language_model_writer_retries_and_records_invalid_answers(counterfactual_config, processor):
    """The writer called by the search's actors, or (``llm_processor``) every source's dialogue run
    first through Ray Data's LLM processor: the same calls, invalid records and rows."""
    server = ScriptedChat(digit_model)
    cfg = copy.deepcopy(counterfactual_config)
    cfg["strategy"]["writer"] = {"name": "chat", "base_url": server.url, "model": "scripted", "attempts": 2}
    cfg["strategy"]["llm_processor"] = processor
    try:
        result = run_campaign(cfg, stop_after="identify")
    finally:
        server.shutdown()
        server.server_close()
    counts = RunStore(cfg["output"], cfg["campaign"], result.run_id).marker("identify")
    firsts = [re.search(r"class is '(\w+)'", b["messages"][1]["content"]).group(1) for b in server.requests
              if len(b["messages"]) == 2 and "Which words" in b["messages"][1]["content"]]
    n7, n1 = firsts.count("7"), firsts.count("1")
    # In the actors, sources the classifier already gets wrong are skipped before any call; the LLM
    # processor, run before the search, writes for every source. Either way they make no image.
    kept = counts["sources"] - counts["sources_misclassified"]
    written = 16 if processor else kept
    assert counts["sources"] == 16 and len(firsts) == written and kept >= 8 and n7 >= 1
    # 3 steps answered once; 1s answered each step twice; 7s given up on after 2 answers to step 1.
    assert counts["llm_calls"] == len(server.requests) == 3 * (written - n7 - n1) + 6 * n1 + 2 * n7
    assert counts["rewrites_invalid"] == n7 and len(counts["rewrites_invalid_first"]) == min(n7, 5)
    assert all("no valid answer in 2 attempts" in e and "let me think" in e for e in counts["rewrites_invalid_first"])
    # (The 7 among these sources is classified right, so kept in both modes.)
    assert counts["counterfactual_texts"] == 2 * (kept - n7) and counts["candidates"] == 4 * (kept - n7)
    store = RunStore(cfg["output"], cfg["campaign"], result.run_id)
    assert store.is_complete("rewrites") == (processor is not None)
    if processor:  # written before the search: the actors read them, calling nothing
        rewrites = store.read_table("rewrites").to_pylist()
        assert len(rewrites) == 16 and store.marker("rewrites")["llm_calls"] == len(server.requests)
        assert sum(not r["valid"] for r in rewrites) == n7 == store.marker("rewrites")["rewrites_invalid"]
        from genstress_ray.context import RunContext
        from genstress_ray.stages.rewrites import prepare_rewrites

        # A finished table is reused (the server is gone by now).
        assert prepare_rewrites(RunContext.open(result.run_uri), {}) == store.marker("rewrites")
    samples = store.read_table("identify").to_pylist()
    assert samples and all(r["source_label"] != 7 for r in samples)
    for r in samples:
        p = json.loads(r["params"])
        assert p["edits"] == [["photo", "painting"]] and p["text"].startswith(f"a painting of a {r['source_label']}")


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
    # Local model folders are checked on the driver, not loaded there: a folder without weights passes
    # the check (the actors would load it), a missing folder or an unknown option does not.
    cfg = copy.deepcopy(counterfactual_config)
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text("{}")
    cfg["strategy"]["writer"] = {"name": "transformers", "uri": str(tmp_path / "lm"), "attempts": 2}
    cfg["strategy"]["captioner"] = {"name": "transformers", "uri": str(tmp_path / "lm"), "samples": 1}
    from genstress_ray.strategies.counterfactual import CounterfactualParams, check_generator

    check_generator(CounterfactualParams(**cfg["strategy"]),
                    load_generator(ModelRef(cfg["generator"]["uri"]), (1, 8, 8), "diffusion_model", 10))
    cfg["strategy"]["writer"]["uri"] = str(tmp_path / "no-lm")
    with pytest.raises(ModelError, match="strategy.writer.uri: .*no-lm' is not a folder"):
        run_campaign({**cfg, "run_id": "r4"})
    cfg["strategy"]["writer"] = {"name": "transformers", "uri": str(tmp_path / "lm"), "top_k": 3}
    with pytest.raises(ModelError, match="strategy.writer: .*top_k"):
        run_campaign({**cfg, "run_id": "r5"})
    with pytest.raises(ConfigError, match="strategy.counterfactual.control: unknown control image kind 'hed'"):
        run_campaign({**counterfactual_config, "strategy": {**counterfactual_config["strategy"], "control": "hed"}})


@pytest.fixture
def segmentation_config(counterfactual_config) -> dict:
    """A campaign testing the built-in segmenter (trained here on the synthetic scenes' masks)."""
    cfg = copy.deepcopy(counterfactual_config)
    cfg.update(data={"search": {"kind": "scenes", "split": "test", "limit": 10, "share": [0.0, 0.5],
                                "options": {"size": 200, "side": 16}}},
               classifier={"task": "segmentation", "params": {"width": 8}, "train": {"epochs": 8}}, oracle=None,
               assessment={"detector": {"architecture": "beta_vae", "params": {"latent_dim": 4, "width": 8,
                                                                                "hidden": 32}, "train": {"epochs": 2}}})
    # The sources' masks, colour-coded, condition the ControlNet (the tiny one takes any 3-channel image).
    cfg["strategy"].update(miou_drop=0.5, keep="all", synonyms={}, control="segmentation")
    return cfg


@pytest.mark.slow
def test_a_segmentation_campaign_scores_miou_drop_through_regions_assessment_and_report(segmentation_config, capsys):
    cfg = segmentation_config
    result = run_campaign(cfg)
    store = RunStore(cfg["output"], cfg["campaign"], result.run_id)
    samples = store.read_table("identify").to_pylist()
    assert len(samples) == 10 * 2 * 2 == store.marker("identify")["candidates"]  # keep: all
    params = [json.loads(r["params"]) for r in samples]
    for r, p in zip(samples, params):
        assert r["fault"] == (p["miou_drop"] > 0.5) and p["miou_source"] > 0.5  # the trained segmenter segments
        assert set(p["iou_drop"]) <= {"ground", "sky", "sign", "car"} and r["source_label"] in (2, 3)
        assert p["control"] == "segmentation" and 0 <= p["edge_agreement"] <= 1
    faults = [(r, p) for r, p in zip(samples, params) if r["fault"]]
    assert faults and result.counts["regions"] >= 1
    # Region samples have no source: each is scored against its anchor, the nearest fault of its class.
    source_miou = {r["source_id"]: p["miou_source"] for r, p in faults}
    fault_labels = {r["source_id"]: r["source_label"] for r, _ in faults}
    region_rows = store.read_table("region_samples").to_pylist()
    assert len(region_rows) == result.counts["regions"] * cfg["reduce"]["samples_per_region"]
    for row in region_rows:
        p = json.loads(row["params"])
        assert fault_labels[p["anchor"]] == row["source_label"]
        assert p["miou_source"] == pytest.approx(source_miou[p["anchor"]], abs=1e-5)  # same image, mask, model
        assert row["fault"] == (p["miou_drop"] > 0.5)

    assert main(["assess", result.run_uri]) == 0
    seg = store.read_json("assessment")["segmentation"]
    drops = [p["iou_drop"]["sky"] for r, p in faults if "sky" in p["iou_drop"]]
    assert seg["iou_drop_by_class"]["sky"] == {"mean_iou_drop": pytest.approx(np.mean(drops)), "faults": len(drops)}
    assert seg["fault_miou_drop"] == pytest.approx(np.mean([p["miou_drop"] for _, p in faults]))
    worst = [v["mean_iou_drop"] for v in seg["iou_drop_by_class"].values()]
    assert worst == sorted(worst, reverse=True)
    assert main(["report", result.run_uri]) == 0
    page = store.fs.cat_file(f"{store.path}/report/index.html").decode()
    assert "id='iou-by-class'" in page and "Mask colours" in page and "alt='mask of scenes:test:" in page
    capsys.readouterr()
    # Labels (one class per image) and the correction they feed are refused, by name.
    assert main(["label", result.run_uri, "--oracle"]) != 0
    assert main(["correct", result.run_uri]) != 0
    err = capsys.readouterr().err
    assert err.count("tests a segmentation model") == 2 and not store.is_complete("labels")


def test_a_segmentation_run_refuses_data_without_masks(segmentation_config):
    cfg = copy.deepcopy(segmentation_config)
    cfg["data"] = {"search": {"kind": "digits", "split": "test", "limit": 4, "share": [0.0, 0.5]}}
    with pytest.raises(DataError, match="data.search: the model under test is a segmentation model .* 'digits' "
                                        "source has no masks"):
        run_campaign(cfg)
    cfg["classifier"] = {"architecture": "small_cnn"}  # a classifier, with control images made from masks
    with pytest.raises(DataError, match="data.search: the strategy's control images are made from masks"):
        run_campaign({**cfg, "run_id": "r2"})
