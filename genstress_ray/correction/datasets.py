"""The correction's data as Ray Data datasets, read where it lives and never through the driver.

D's splits come from the data source's shards (read tasks fetch and decode them, as in the search),
the region sets and the labelled faults from the run's Parquet, and the real images inside the
failure regions from actors that encode a split with the run's generator and keep its members. The
Ray Train workers read them with ``get_dataset_shard``. Every dataset has the columns ``image``
(uint8 C x H x W), ``label``, ``region`` (the image's failure region, -1 for none) and ``target``
(that region's label, -1 for none: a real member whose own label equals it is of the region's
subgroup, any other of its collateral).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from genstress_ray.data import Catalog, DatasetSource, decode_images
from genstress_ray.models import load_generator
from genstress_ray.real_regions import FailureRegions
from genstress_ray.stages.shards import bytes_table, read_shards, table_bytes
from genstress_ray.storage import RunStore


def _rows(images: np.ndarray, labels, regions=None, targets=None) -> dict[str, np.ndarray]:
    labels = np.asarray(labels, np.int64)
    none = np.full(len(labels), -1, np.int64)
    return {"image": images, "label": labels, "region": none if regions is None else np.asarray(regions, np.int64),
            "target": none if targets is None else np.asarray(targets, np.int64)}


def _split_rows(batch: dict[str, np.ndarray], shape: tuple, relabels: dict[str, int]) -> dict[str, np.ndarray]:
    """Source rows (a shard's IPC table per row) -> image rows, with the accepted relabels applied."""
    tables = [bytes_table(b) for b in batch["rows"]]
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows == 0:
        return _rows(np.zeros((0, *shape), np.uint8), [])
    images = np.frombuffer(b"".join(table["image"].to_pylist()), np.uint8).reshape(-1, *shape)
    labels = table["source_label"].to_numpy().copy()
    if relabels:
        for i, sid in enumerate(table["source_id"].to_pylist()):
            labels[i] = relabels.get(sid, labels[i])
    return _rows(images, labels)


def split_dataset(source: DatasetSource, catalog: Catalog, shard_rows: int, read_cpus: float,
                  relabels: dict[str, int] | None = None, shuffle_seed: int | None = None) -> ray.data.Dataset:
    """A split of D (an opened source: ``context.open_source``) as a dataset, one block per shard.

    ``relabels`` maps a row's source id to its new label (data repair's accepted relabels);
    ``shuffle_seed`` reads the shards in a seeded random order (a training split: a folder's shards
    hold one class after another).
    """
    shards = source.shards(shard_rows)
    items = [{"shard": s.name, "rows": table_bytes(s.rows), "counts": "{}"} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    if shuffle_seed is not None:
        ds = ds.randomize_block_order(seed=shuffle_seed)
    if source.streaming:
        ds = ds.map_batches(read_shards, batch_size=1, batch_format="numpy", fn_kwargs={"source": source},
                            num_cpus=read_cpus)
    ds = ds.map_batches(_split_rows, batch_size=1, batch_format="numpy", num_cpus=read_cpus,
                        fn_kwargs={"shape": tuple(catalog.image_shape), "relabels": relabels or {}})
    return ds


def _stage_dataset(store: RunStore, stage: str, columns: list[str], read_cpus: float, rows) -> ray.data.Dataset:
    """A stage's Parquet files read by tasks, one block per file, each made into rows by ``rows(table)``.

    Ray Data's own Parquet reader lists files in a task that asks for a whole CPU, which never gets one
    while the trials hold the rest; the files are known, so the read tasks take them directly.
    """
    files = store.parquet_files(stage)
    fs = store.arrow_filesystem()

    def read(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        table = pa.concat_tables([pq.read_table(path, columns=columns, filesystem=fs) for path in batch["path"]])
        return rows(table)

    return ray.data.from_items([{"path": p} for p in files], override_num_blocks=max(1, len(files))).map_batches(
        read, batch_size=1, batch_format="numpy", num_cpus=read_cpus)


def _decoded(table: pa.Table, keep: np.ndarray, labels: np.ndarray, regions, shape: tuple, what: str):
    table = table.filter(pa.array(keep))
    if table.num_rows == 0:
        return _rows(np.zeros((0, *shape), np.uint8), [])
    ids = table["sample_id"].to_pylist()
    images = decode_images(table["image"].to_pylist(), [f"{what} {i}" for i in ids], None)
    return _rows(images, labels[keep], None if regions is None else regions[keep])


def region_set_dataset(store: RunStore, draws: tuple[int, int], shape: tuple, read_cpus: float) -> ray.data.Dataset:
    """The region sets' samples with ``draws[0] <= draw < draws[1]``, labelled with their region's label."""
    def part(table: pa.Table) -> dict[str, np.ndarray]:
        draw = table["draw"].to_numpy()
        keep = (draw >= draws[0]) & (draw < draws[1])
        return _decoded(table, keep, table["source_label"].to_numpy(), table["region_id"].to_numpy(), shape,
                        "region sample")

    return _stage_dataset(store, "region_sets", ["sample_id", "image", "draw", "source_label", "region_id"],
                          read_cpus, part)


def fault_dataset(store: RunStore, labels: dict[str, int], shape: tuple, read_cpus: float) -> ray.data.Dataset:
    """The faults of ``labels`` (sample id -> label index), each with its label: the baseline's Df."""
    def labelled(table: pa.Table) -> dict[str, np.ndarray]:
        label = np.asarray([labels.get(s, -1) for s in table["sample_id"].to_pylist()], np.int64)
        return _decoded(table, label >= 0, label, None, shape, "fault")

    return _stage_dataset(store, "identify", ["sample_id", "image"], read_cpus, labelled)


def kept_in_memory(datasets: dict[str, ray.data.Dataset], rows: dict[str, int], image_bytes: int,
                   budget_mib: int) -> tuple[dict[str, ray.data.Dataset], list[str]]:
    """``datasets`` with those whose decoded images fit ``budget_mib`` together (smallest first, by
    ``rows``) read once into Ray's object store (never the driver), and the names of those kept."""
    out, left, kept = dict(datasets), budget_mib * 2**20, []
    for name in sorted((n for n in rows if n in datasets), key=rows.get):
        if rows[name] * image_bytes <= left:
            out[name] = datasets[name].materialize()
            left -= rows[name] * image_bytes
            kept.append(name)
    return out, kept


class PlaceInRegions:
    """Ray Data actor: keep the images that lie inside a failure region (``real_regions``), with their
    ``region`` and its label as ``target``. Each keeps its own label, what a verdict is measured
    against; with ``relabel`` (Df of ``correction.region_data: real``) it takes the region's label."""

    def __init__(self, placement: dict[str, Any], threads: int = 1, relabel: bool = False):
        torch.set_num_threads(threads)
        p = placement
        generator = load_generator(p["generator"], p["image_shape"], p["generator_kind"], len(p["class_names"]))
        self.regions = FailureRegions(generator, bytes_table(p["regions"]), p["fault_latents"], p["failure_labels"],
                                      p["quantile"])
        self.relabel = relabel

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        region, target, _ = self.regions.place(images)
        inside = target >= 0
        label = target[inside] if self.relabel else batch["label"][inside]
        return _rows(images[inside], label, region[inside], target[inside])


def members_dataset(split: ray.data.Dataset, placement: dict[str, Any], num_cpus: float, threads: int,
                    relabel: bool = False) -> ray.data.MaterializedDataset:
    """The members of ``split`` inside the failure regions (with their own labels; with ``relabel``,
    their region's), computed once and kept in the object store (every trial reads them)."""
    return split.map_batches(PlaceInRegions, batch_format="numpy", batch_size=512,
                             compute=ray.data.ActorPoolStrategy(size=1), num_cpus=num_cpus,
                             fn_constructor_kwargs={"placement": placement, "threads": threads,
                                                    "relabel": relabel}).materialize()


def placement(regions: FailureRegions, generator, generator_kind: str, image_shape,
              class_names: list[str]) -> dict[str, Any]:
    """What ``PlaceInRegions`` actors rebuild ``regions`` from (model references, never loaded modules)."""
    return {"generator": generator, "generator_kind": generator_kind, "image_shape": tuple(image_shape),
            "class_names": list(class_names), "regions": table_bytes(regions.regions),
            "fault_latents": regions.fault_latents, "failure_labels": dict(regions.failure_labels),
            "quantile": regions.quantile}
