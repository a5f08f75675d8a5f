"""The campaign on a real local Ray cluster, writing to a temporary folder and to a loopback S3 server."""

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from genstress_ray.data import DataError, get_source
from genstress_ray.models import ModelError, ModelRef, get_model, load_classifier, load_generator, save_checkpoint
from genstress_ray.pipeline import STAGES, run_campaign
from genstress_ray.storage import REGION_SAMPLES_SCHEMA, SAMPLES_SCHEMA, RunStore, StorageError

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _store(result, cfg):
    return RunStore(cfg["output"], cfg["campaign"], result.run_id)


def _sorted_rows(store, stage, columns):
    table = store.read_table(stage, columns=columns)
    return table.sort_by("sample_id").to_pylist()


def test_identify_writes_the_samples_table_with_faults_that_recompute(tiny_config, tiny_models):
    result = run_campaign(tiny_config)
    store = _store(result, tiny_config)
    samples = store.read_table("identify")
    assert samples.schema.equals(SAMPLES_SCHEMA)
    n_images, draws, k = 48, 8, 3
    assert result.counts["candidates"] == n_images * draws
    assert samples.num_rows == result.counts["samples"] > 0
    assert len(set(samples["sample_id"].to_pylist())) == samples.num_rows
    per_source = pc.value_counts(samples["source_id"]).to_pylist()
    assert max(v["counts"] for v in per_source) <= k
    assert all(samples["fault"].to_pylist())
    # Recompute every kept candidate: decode its latent, classify, compare with the stored row.
    images = get_source("digits", split="test", limit=48, share=(0.0, 0.5)).load()
    clf = load_classifier(ModelRef(tiny_models["classifier"]), images.class_names, images.image_shape)
    gen = load_generator(ModelRef(tiny_models["generator"]), images.image_shape)
    latents = torch.tensor(samples["latent"].to_pylist())
    with torch.no_grad():
        logits = clf(gen.decode(latents))
    assert logits.argmax(1).tolist() == samples["pred"].to_pylist()
    assert (logits.argmax(1) != torch.tensor(samples["source_label"].to_pylist())).all()
    np.testing.assert_allclose(np.stack(samples["probs"].to_numpy(zero_copy_only=False)),
                               logits.softmax(1).numpy(), atol=1e-5)
    labels = dict(zip(images.source_ids, images.labels.tolist()))
    assert [labels[s] for s in samples["source_id"].to_pylist()] == samples["source_label"].to_pylist()
    # The manifest records config, versions, seeds, timings and row counts.
    manifest = store.read_manifest()
    assert manifest["status"] == "complete" and manifest["row_counts"]["samples"] == samples.num_rows
    assert {"ray", "torch", "python"} <= set(manifest["versions"]) and set(STAGES) <= set(manifest["timings"])
    assert manifest["stages"]["identify"]["nonfinite_dropped"] == 0


def test_regions_and_region_samples_follow_the_faults(tiny_config):
    result = run_campaign(tiny_config)
    store = _store(result, tiny_config)
    regions = store.read_table("regions")
    region_samples = store.read_table("region_samples")
    assert regions.num_rows == result.counts["regions"] >= 1
    assert sum(regions["n_members"].to_pylist()) <= result.counts["faults"]
    assert region_samples.schema.equals(REGION_SAMPLES_SCHEMA)
    assert region_samples.num_rows == 4 * regions.num_rows
    assert set(region_samples["region_id"].to_pylist()) == set(regions["region_id"].to_pylist())
    assert set(region_samples["strategy"].to_pylist()) == {"defuse"}


def test_images_whose_reconstruction_is_misclassified_are_skipped_before_any_draw(tiny_config):
    """With only_correct_reconstructions, a search image whose own reconstruction the classifier gets
    wrong costs no decode: its draws are neither candidates nor rows, only a skipped seed."""
    tiny_config["strategy"].update(keep="all", only_correct_reconstructions=True)
    result = run_campaign(tiny_config, stop_after="identify")
    store = _store(result, tiny_config)
    marker = store.marker("identify")
    skipped = marker["seeds_skipped"]
    assert 0 < skipped < 48  # the tiny random models get some reconstructions right, not all
    assert result.counts["candidates"] == (48 - skipped) * 8 == result.counts["samples"]
    rows = store.read_table("identify", columns=["source_id", "source_label"])
    # The written seeds are exactly those whose reconstruction the classifier gets right.
    search = get_source("digits", split="test", limit=48, share=(0.0, 0.5)).load()
    gen = load_generator(ModelRef(tiny_config["generator"]["uri"]), (1, 8, 8))
    clf = load_classifier(ModelRef(tiny_config["classifier"]["uri"]), search.class_names, (1, 8, 8))
    with torch.no_grad():
        x = torch.from_numpy(search.images).float() / 255
        ok = clf(gen.decode(gen.encode(x)[0])).argmax(1).numpy() == search.labels
    assert set(rows["source_id"].to_pylist()) == {s for s, good in zip(search.source_ids, ok) if good}


def test_keep_all_writes_every_candidate(tiny_config):
    tiny_config["strategy"]["keep"] = "all"
    result = run_campaign(tiny_config)
    store = _store(result, tiny_config)
    assert result.counts["samples"] == 48 * 8
    assert store.count_rows("identify", filter=pc.field("fault")) == result.counts["faults"]


def test_rerunning_a_finished_run_skips_every_stage(tiny_config):
    first = run_campaign(tiny_config)
    again = run_campaign(tiny_config)
    assert again.skipped == list(STAGES) and again.counts == first.counts


def test_stop_after_identify_then_a_plain_rerun_finishes_the_rest(tiny_config):
    first = run_campaign(tiny_config, stop_after="identify")
    store = _store(first, tiny_config)
    assert store.is_complete("identify") and not store.is_complete("regions")
    assert store.read_manifest()["status"] == "stopped after identify" and first.regions == []
    rest = run_campaign(tiny_config)
    assert rest.skipped == ["identify"] and store.is_complete("region_samples")
    with pytest.raises(ValueError, match="stop_after: unknown stage 'train'"):
        run_campaign(tiny_config, stop_after="train")


def _interrupt_identify(store, lost_shards):
    """What a crash mid-stage leaves: no marker, some shards written and others not, a half-written
    temporary file, a stray file, and later stages not yet run."""
    for stage in STAGES:
        marker = f"{store.stage_path(stage)}/_COMPLETE"
        if store.fs.exists(marker):
            store.fs.rm(marker)
    shards = store.shard_files("identify")
    some = next(iter(shards.values()))
    store.fs.copy(some, f"{store.stage_path('identify')}/partial-from-crash.parquet")
    store.fs.copy(some, f"{some}.tmp-0123")
    for name in list(shards)[:lost_shards]:
        store.fs.rm(shards[name])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_interrupted_run_resumes_without_duplicate_or_partial_rows(tiny_config, where, request):
    if where == "s3":
        tiny_config["output"] = request.getfixturevalue("s3_bucket") + "/genstress"
    tiny_config["shard_rows"] = 16
    clean = run_campaign(tiny_config)
    store = _store(clean, tiny_config)
    expected = _sorted_rows(store, "identify", ["sample_id", "pred"])
    shards = store.marker("identify")["shards"]
    assert shards == 3 and len(store.shard_files("identify")) == 3  # 48 images, 16 per shard
    _interrupt_identify(store, lost_shards=1)
    assert store.count_rows("identify") > len(expected) - 16  # the stray rows are visible before resuming
    resumed = run_campaign(tiny_config)
    assert resumed.skipped == []
    info = store.marker("identify")
    assert (info["shards_computed"], info["shards_reused"]) == (1, 2)  # only the lost shard was computed
    assert _sorted_rows(store, "identify", ["sample_id", "pred"]) == expected
    assert not [p for p in store.fs.ls(store.stage_path("identify")) if "partial" in p or ".tmp-" in p]
    assert resumed.counts == clean.counts


def test_a_failure_in_a_later_stage_keeps_finished_stages_and_resume_redoes_only_the_rest(tiny_config, monkeypatch):
    import genstress_ray.pipeline as pipeline

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash in region sampling")

    monkeypatch.setattr(pipeline, "run_region_samples", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_campaign(tiny_config)
    store = RunStore(tiny_config["output"], tiny_config["campaign"], tiny_config["run_id"])
    assert store.is_complete("identify") and store.is_complete("regions")
    assert not store.is_complete("region_samples")
    monkeypatch.undo()
    resumed = run_campaign(tiny_config)
    assert resumed.skipped == ["identify", "regions"]
    assert store.is_complete("region_samples")


def test_writes_to_s3_through_s3fs(tiny_config, s3_bucket):
    result = run_campaign(tiny_config, output=f"{s3_bucket}/genstress", run_id="nightly-01")
    assert result.run_uri == f"{s3_bucket}/genstress/test/nightly-01"
    import s3fs

    fs = s3fs.S3FileSystem()
    names = fs.ls(f"{s3_bucket}/genstress/test/nightly-01")
    assert {n.rsplit("/", 1)[1] for n in names} >= {"identify", "regions", "region_samples", "manifest.json"}
    assert fs.exists(f"{s3_bucket}/genstress/test/nightly-01/identify/_COMPLETE")
    assert result.counts["samples"] == _store(result, {**tiny_config, "output": f"{s3_bucket}/genstress"}).count_rows("identify")


def _constant_classifier(path) -> str:
    """A classifier that predicts class 0 for every image."""
    params = {"in_shape": [1, 8, 8], "num_classes": 10, "width": 4, "hidden": 16}
    net = get_model("small_cnn", **params)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.head[-1].bias[0] = 10.0
    save_checkpoint(net, str(path), "small_cnn", params)
    return str(path)


def _digits_parquet(path, search_labels) -> str:
    """Real digits as a Parquet dataset whose test split holds only ``search_labels``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from genstress_ray.data import png_bytes

    digits = get_source("digits", split="train").load()
    split = ["test" if y in search_labels else "train" for y in digits.labels.tolist()]
    pq.write_table(pa.table({"image": [png_bytes(im) for im in digits.images], "label": digits.labels,
                             "split": split}), path)
    return str(path)


def test_zero_faults_finish_every_stage_with_a_clear_message(tiny_config, tmp_path):
    tiny_config["classifier"] = {"uri": _constant_classifier(tmp_path / "const.safetensors")}
    tiny_config["data"]["search"] = {"kind": "parquet", "uri": _digits_parquet(tmp_path / "d.parquet", {0}),
                                     "split": "test", "limit": 20, "share": [0.0, 0.5]}
    result = run_campaign(tiny_config)
    assert result.counts["candidates"] == 20 * 8
    assert result.counts["faults"] == result.counts["samples"] == 0
    assert result.counts["regions"] == result.counts["region_samples"] == 0
    assert "0 faults found" in result.message and "0 faults found" in result.summary()


class _NaNDecoder(torch.nn.Module):
    """A latent generator whose decode gives NaN images wherever the first latent exceeds 0.5."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 64)

    @torch.jit.export
    def encode(self, x: torch.Tensor):
        zeros = torch.zeros(x.shape[0], 2)
        return zeros, zeros

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        images = torch.sigmoid(self.proj(z)).view(-1, 1, 8, 8)
        bad = (z[:, 0] > 0.5).view(-1, 1, 1, 1)
        return torch.where(bad, torch.full_like(images, float("nan")), images)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)


def test_non_finite_decodes_are_counted_and_dropped(tiny_config, tmp_path):
    from genstress_ray.strategies import beta_noise

    path = tmp_path / "nan_vae.pt"
    torch.jit.save(torch.jit.script(_NaNDecoder()), str(path))
    tiny_config["generator"] = {"uri": str(path)}
    tiny_config["strategy"]["keep"] = "all"
    result = run_campaign(tiny_config)
    ids = get_source("digits", split="test", limit=48, share=(0.0, 0.5)).load().source_ids
    expected_bad = int((beta_noise(ids, 2, 8, 1.0, 1.0, seed=0)[..., 0] > 0.5).sum())
    assert 0 < expected_bad < 48 * 8
    store = _store(result, tiny_config)
    assert store.read_manifest()["stages"]["identify"]["nonfinite_dropped"] == expected_bad
    assert result.counts["samples"] == 48 * 8 - expected_bad
    latents = np.asarray(store.read_table("identify", columns=["latent"])["latent"].to_pylist())
    assert (latents[:, 0] <= 0.5).all()


# ---- bad input: a clear error before work starts, nothing marked complete -------------------------

def _nothing_complete(cfg):
    store = RunStore(cfg["output"], cfg["campaign"], cfg["run_id"])
    return not any(store.is_complete(s) for s in STAGES)


def test_missing_data_path(tiny_config):
    tiny_config["data"]["search"] = {"kind": "mnist", "uri": "/nonexistent/mnist"}
    with pytest.raises(DataError, match=r"^data\.search\.uri: .*/nonexistent/mnist"):
        run_campaign(tiny_config)
    assert _nothing_complete(tiny_config)


def test_classifier_with_wrong_class_count(tiny_config, tmp_path):
    uri = str(tmp_path / "c3.safetensors")
    params = {"in_shape": [1, 8, 8], "num_classes": 3, "width": 4, "hidden": 16}
    save_checkpoint(get_model("small_cnn", **params), uri, "small_cnn", params)
    tiny_config["classifier"] = {"uri": uri}
    with pytest.raises(ModelError, match="dataset has 10 classes"):
        run_campaign(tiny_config)
    assert _nothing_complete(tiny_config)


def test_images_of_another_size_than_the_models_are_made_to_fit_them(tiny_config):
    # The tiny models take 8x8 images; the run's images are 28x28 and are resized on the way in and out.
    tiny_config["data"]["search"]["resize"] = 28
    result = run_campaign(tiny_config)
    manifest = _store(result, tiny_config).read_manifest()
    assert manifest["status"] == "complete" and manifest["image_shape"] == [1, 28, 28]
    assert result.counts["candidates"] == 48 * 8


def test_checkpoint_that_fails_to_load(tiny_config, tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 32)
    tiny_config["generator"] = {"uri": str(tmp_path / "broken.safetensors")}
    with pytest.raises(ModelError, match="broken.safetensors"):
        run_campaign(tiny_config)
    assert _nothing_complete(tiny_config)


def test_output_that_cannot_be_written(tiny_config, tmp_path):
    (tmp_path / "ro").write_text("a file, not a folder")
    with pytest.raises(StorageError, match="not writable"):
        run_campaign(tiny_config, output=str(tmp_path / "ro"))


def test_generator_in_the_classifier_slot_is_named(tiny_config):
    tiny_config["classifier"] = {"architecture": "beta_vae"}
    with pytest.raises(ModelError, match="classifier.architecture: 'beta_vae' is a latent_generator"):
        run_campaign(tiny_config)
