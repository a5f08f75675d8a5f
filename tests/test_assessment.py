"""assess_run on real tiny runs: every metric is present, in range, and consistent with the run."""

import json

import pytest

from genstress_ray.assessment import assess_run
from genstress_ray.pipeline import run_campaign
from genstress_ray.report import write_report
from genstress_ray.storage import RunStore

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.mark.parametrize("strategy", ["mixing", "truncation"])
def test_assessment_of_a_style_run(style_config, tiny_models, strategy):
    cfg = {**style_config, "assessment": {"detector": {"uri": tiny_models["generator"]}, "quantile": 0.9}}
    if strategy == "truncation":
        cfg["strategy"] = {"name": "truncation", "seeds": 24, "budget_calls": 40}
    result = run_campaign(cfg, stop_after="identify")
    summary = assess_run(result.run_uri)
    store = RunStore.from_uri(result.run_uri)
    marker = store.marker("identify")
    assert json.loads(store.fs.cat_file(store.stage_path("assessment"))) == json.loads(json.dumps(summary))
    assert summary["strategy"] == strategy and summary["faults"] == marker["faults"] > 0
    fd = summary["fault_detection"]
    assert fd["faults_per_call"] == marker["faults"] / marker["generator_calls"]
    assert fd["faults_per_candidate"] == marker["faults"] / marker["candidates"]
    assert summary["validity"]["real_valid"] >= 0.89  # the quantile's calibration on real images
    assert 0 <= summary["validity"]["faults_valid"] <= 1
    assert summary["diversity"]["mean_pairwise_feature_distance"] > 0
    assert 1 <= summary["diversity"]["distinct_class_pairs"] <= 90
    assert summary["frechet_distance"] > 0
    report = store.fs.cat_file(write_report(store).replace(store.uri, store.path)).decode()
    assert f"{fd['faults_per_call']:.4f}" in report and "Frechet distance to real images" in report
    if strategy == "mixing":
        assert 0 < summary["validity"]["ssim_to_seed"] <= 1
        assert 0 <= summary["bisection"]["mean_iterations"] <= summary["bisection"]["max_iterations"] <= 20
    else:
        assert "ssim_to_seed" not in summary["validity"]


def test_assessing_an_unfinished_run_is_refused(style_config):
    result = run_campaign(style_config, stop_after="identify")
    store = RunStore.from_uri(result.run_uri)
    store.fs.rm(f"{store.path}/identify/_COMPLETE")
    with pytest.raises(ValueError, match="identify stage is not complete"):
        assess_run(result.run_uri)


def test_the_assessment_does_not_depend_on_how_the_rows_were_written(style_config, tiny_models):
    """Two runs of one config, written by different actor pools and batches (so Parquet files in
    another order), assessed on a subsample of their faults, give the same figures."""
    cfg = {**style_config, "assessment": {"detector": {"uri": tiny_models["generator"]}, "max_faults": 5}}
    other = {**cfg, "run_id": "r2", "resources": {"search": {"actors": 2, "num_cpus": 0.5, "batch_size": 5}}}
    a = assess_run(run_campaign(cfg, stop_after="identify").run_uri)
    b = assess_run(run_campaign(other, stop_after="identify").run_uri)
    assert a["faults"] > 5 and a["faults_assessed"] == 5
    for key in ("diversity", "validity", "frechet_distance", "bisection"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
