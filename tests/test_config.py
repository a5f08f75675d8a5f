from pathlib import Path

import pytest

from genstress_ray.config import CampaignConfig, ConfigError, load_config

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def test_defaults_validate_and_resources_become_ray_arguments():
    cfg = load_config({"campaign": "c"})
    args = cfg.resources.search.ray_args()
    assert args["num_cpus"] == 0.5 and args["compute"].min_size == 1 and cfg.resources.search.batch_size == 64


@pytest.mark.parametrize("raw, field, allowed", [
    ({"strategy": {"name": "gan_attack"}}, "strategy", "'defuse'"),
    ({"strategy": {"name": "defuse", "draws": -1}}, "strategy.defuse.draws", "greater than 0"),
    ({"strategy": {"name": "defuse", "a": 0}}, "strategy.defuse.a", "greater than 0"),
    ({"strategy": {"name": "defuse", "b": -2}}, "strategy.defuse.b", "greater than 0"),
    ({"strategy": {"name": "defuse", "keep": "some"}}, "strategy.defuse.keep", "'faults' or 'all'"),
    ({"data": {"search": {"kind": "cifar"}}}, "data.search.kind", "allowed: digits"),
    ({"data": {"search": {"split": "dev"}}}, "data.search.split", "allowed: train, validation, test"),
    ({"classifier": {"architecture": "vit"}}, "classifier.architecture", "allowed: beta_vae, small_cnn"),
    ({"classifier": {"uri": "x.pt", "format": "onnx"}}, "classifier.format", "allowed: auto, torchscript"),
    ({"resources": {"search": {"batch_size": 0}}}, "resources.search.batch_size", "greater than 0"),
    ({"campaign": "has space"}, "campaign", "is not a name: letters, digits"),
    ({"surprise": 1}, "surprise", "Extra inputs"),
    # Values that used to fail only inside a Ray task ("UDF failed to process a data block").
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"seed": 2**70}, "seed", "less than"),
    ({"data": {"search": {"seed": -3}}}, "data.search.seed", "greater than or equal to 0"),
    ({"strategy": {"name": "defuse", "draws": 10**12}}, "strategy.defuse.draws", "less than or equal to 1000000"),
    ({"strategy": {"name": "defuse", "a": float("inf")}}, "strategy.defuse.a", "finite number"),
    ({"strategy": {"name": "defuse", "b": float("nan")}}, "strategy.defuse.b", "finite number"),
])
def test_each_bad_value_is_named_with_what_is_allowed(raw, field, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    line = next(l for l in str(err.value).splitlines() if l.strip().startswith(field + ":"))
    assert allowed in line


def test_invalid_yaml_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("campaign: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


def test_a_key_given_twice_is_refused_not_silently_replaced(tmp_path):
    """Plain YAML keeps the last of two equal keys: ``draws: 100`` then ``draws: 5`` ran with 5."""
    path = tmp_path / "c.yaml"
    path.write_text("campaign: c\nstrategy:\n  name: defuse\n  draws: 100\n  draws: 5\n")
    with pytest.raises(ConfigError, match=r"(?s)c.yaml' is not valid YAML: key 'draws' is given twice.*line 5"):
        load_config(path)
    from genstress_ray.scan.config import load_scan_config

    path.write_text("scan: s\nscan: t\nregistry: r\ncampaigns: [a.yaml]\n")
    with pytest.raises(ConfigError, match="key 'scan' is given twice"):
        load_scan_config(path)


def test_overrides_replace_output_and_run_id():
    cfg = load_config({"output": "a"}, output="s3://b/x", run_id="nightly-01")
    assert (cfg.output, cfg.run_id) == ("s3://b/x", "nightly-01")


def test_the_shipped_mnist_job_validates():
    cfg = load_config(JOBS / "mnist_defuse.yaml")
    assert isinstance(cfg, CampaignConfig) and cfg.data.search.kind == "mnist"
    assert cfg.data.train is not None and cfg.data.train.uri.endswith("mnist_train_first20k")


def test_the_paper_settings_job_holds_the_papers_hyper_parameters():
    cfg = load_config(JOBS / "mnist_defuse_paper.yaml")
    s, c = cfg.strategy, cfg.correction
    assert (s.a, s.b, s.draws, cfg.reduce.max_components, cfg.reduce.weight_threshold, cfg.reduce.tau) == \
        (50, 50, 500, 100, 0.01, 0.5)
    assert len(c.lambdas) == 17 and (c.epochs, c.finetune_per_region, c.test_per_region) == (3, 256, 256)
    assert cfg.data.search.split == "train" and cfg.generator.params["latent_dim"] == 10


def test_the_shipped_kldb_jobs_validate():
    mnist, imagenet = load_config(JOBS / "mnist_kldb.yaml"), load_config(JOBS / "imagenet_kldb.yaml")
    assert mnist.strategy.classes == ["4", "9"] and mnist.generator.architecture == "small_ddpm"
    assert imagenet.strategy.classes == ["chihuahua", "papillon"] and imagenet.generator.format == "diffusers"
    assert imagenet.strategy.alphas == [0.0, 0.05, 0.1, 0.15, 0.2, 0.5, 1.0] and imagenet.resources.search.num_gpus == 1


def test_the_shipped_counterfactual_job_validates_with_the_reference_settings():
    s = load_config(JOBS / "imagenet_counterfactual.yaml").strategy
    assert s.name == "counterfactual" and (s.per_caption, s.steps, s.scheduler) == (5, 5, "UniPCMultistepScheduler")
    assert s.writer["name"] == "chat" and s.writer["api_key_env"] == "LLM_API_KEY" and s.captioner["samples"] == 2


def test_unknown_data_options_are_named_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"data.search.options: the digits source takes no option 'bogus'; "
                                          r"allowed: class_names"):
        load_config({"data": {"search": {"kind": "digits", "options": {"bogus": 1}}}})
    assert load_config({"data": {"search": {"kind": "mnist", "uri": "/x", "options": {"split_from": "test"}}}})


def test_local_paths_become_absolute_when_the_config_is_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config({"data": {"search": {"kind": "mnist", "uri": "data/mnist"}},
                       "classifier": {"uri": "models/cnn.pt"}})
    assert cfg.output == f"{tmp_path}/genstress-runs" and cfg.data.search.uri == f"{tmp_path}/data/mnist"
    assert cfg.classifier.uri == f"{tmp_path}/models/cnn.pt"
    assert load_config({"output": "s3://bucket/runs"}).output == "s3://bucket/runs"


CF = {"name": "counterfactual", "controlnet": "cn"}


@pytest.mark.parametrize("raw, message", [
    ({"classifier": {"task": "segmentation"}}, "classifier.task: segmentation models are tested by strategy "
                                               "counterfactual"),
    ({"classifier": {"task": "segmentation", "architecture": "small_cnn"}, "strategy": CF},
     "classifier.architecture: 'small_cnn' is a classifier; a segmentation model under test needs a segmenter"),
    ({"oracle": {"task": "segmentation", "architecture": "small_segnet"}}, "oracle.task: only the model under test"),
    ({"classifier": {"task": "detection"}}, "classifier.task"),
    ({"strategy": {**CF, "llm_processor": {}}}, "llm_processor: runs a language model's dialogue through Ray Data's "
                                                "LLM processor, and writer 'lexicon' is none"),
    ({"strategy": {**CF, "writer": {"name": "vllm", "model_source": "m"}}}, "writer: 'vllm' runs only through"),
])
def test_a_segmentation_model_under_test_is_checked_against_strategy_and_architecture(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(raw)


def test_an_llm_processor_takes_a_chat_or_vllm_writer():
    for writer in ({"name": "chat", "base_url": "http://x/v1", "model": "m"}, {"name": "vllm", "model_source": "m"}):
        s = load_config({"strategy": {**CF, "writer": writer, "llm_processor": {"qps": 5}}}).strategy
        assert (s.llm_processor.batch_size, s.llm_processor.qps) == (16, 5)


def test_a_segmentation_model_under_test_defaults_to_the_built_in_segmenter():
    cfg = load_config({"classifier": {"task": "segmentation", "train": {"epochs": 2}}, "strategy": CF})
    assert (cfg.classifier.architecture, cfg.classifier.train, cfg.strategy.miou_drop) == ("small_segnet", {"epochs": 2}, 0.1)
    assert load_config({"classifier": {"task": "segmentation"}, "strategy": CF}).classifier.train == {"epochs": 5}
