"""The correction's data as Ray Data datasets: the same rows the in-memory path holds, read where they live."""

import io

import numpy as np
import pytest
import ray
from PIL import Image
from ray.data.dataset import MaterializedDataset

from genstress_ray.context import open_source
from genstress_ray.config import DataSpec
from genstress_ray.correction.datasets import fault_dataset, kept_in_memory, region_set_dataset, split_dataset

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _rows(ds):
    rows = ds.take_all()
    return sorted((r["label"], r["region"], r["image"].tobytes()) for r in rows)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_split_streams_the_same_rows_the_source_loads_with_relabels_applied(tmp_path, streaming):
    if streaming:
        rng = np.random.default_rng(0)
        for cls in ("cat", "dog"):
            (tmp_path / cls).mkdir()
            for i in range(20):
                (tmp_path / cls / f"{i}.png").write_bytes(_png(rng.integers(0, 255, (6, 6), dtype=np.uint8)))
        spec = DataSpec(kind="image_folder", uri=str(tmp_path), split="train")
    else:
        spec = DataSpec(kind="digits", split="train")
    source, catalog = open_source(spec)
    loaded = source.load()
    relabelled = {loaded.source_ids[0]: (int(loaded.labels[0]) + 1) % len(loaded.class_names)}
    ds = split_dataset(source, catalog, shard_rows=7, read_cpus=0.25, relabels=relabelled, shuffle_seed=3)
    labels = loaded.labels.copy()
    labels[0] = relabelled[loaded.source_ids[0]]
    assert _rows(ds) == sorted((int(y), -1, x.tobytes()) for x, y in zip(loaded.images, labels))
    assert ds.take(1)[0]["image"].shape == catalog.image_shape


def test_region_sets_and_faults_are_read_from_the_runs_parquet(labelled_run):
    store = labelled_run
    from genstress_ray.correction import run_correction

    run_correction(store.uri, {"lambdas": [1.0], "workers": 0, "epochs": 1})
    sets = store.read_table("region_sets", columns=["draw", "source_label", "region_id"])
    shape = (1, 8, 8)
    parts = [region_set_dataset(store, draws, shape, 0.25) for draws in ((0, 16), (16, 20), (20, 30))]
    counts = [p.count() for p in parts]
    draw = sets["draw"].to_numpy()
    assert counts == [int(((draw >= lo) & (draw < hi)).sum()) for lo, hi in ((0, 16), (16, 20), (20, 30))]
    assert sum(counts) == sets.num_rows
    assert {(r["label"], r["region"]) for r in parts[0].take_all()} == {(3, 0)}
    faults = store.read_table("identify", columns=["sample_id"])["sample_id"].to_pylist()[:4]
    chosen = fault_dataset(store, {s: i for i, s in enumerate(faults)}, shape, 0.25).take_all()
    assert sorted(r["label"] for r in chosen) == [0, 1, 2, 3] and {r["region"] for r in chosen} == {-1}


def test_datasets_that_fit_the_budget_are_kept_smallest_first_and_the_rest_stream():
    datasets = {name: ray.data.range(n).map_batches(lambda b: b) for name, n in (("small", 10), ("mid", 30),
                                                                                ("big", 2000))}
    image_bytes = 1024  # so 1 MiB holds 1024 rows: small and mid fit together, big does not
    out, kept = kept_in_memory(datasets, {"small": 10, "mid": 30, "big": 2000}, image_bytes, 1)
    assert kept == ["small", "mid"]
    assert all(isinstance(out[n], MaterializedDataset) for n in kept)
    assert not isinstance(out["big"], MaterializedDataset) and out["big"] is datasets["big"]
    assert out["mid"].count() == 30
    assert kept_in_memory(datasets, {"small": 10}, image_bytes, 0)[1] == []
