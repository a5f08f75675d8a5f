"""Stages run shard by shard, so a rerun computes only what is missing and no row is written twice.

The driver holds the shards' names and index rows (paths, keys, labels: never pixels, for a streaming
source). Ray Data reads each shard in a task (``read_shards``: fetch and decode), and a model actor
computes it and writes it as one Parquet file named by the shard, its counts (candidates, faults,
images skipped, ...) in the file's metadata (``ModelStage``). The stage's totals are the sum over its
shard files: a retried task rewrites its own file and can never count twice. Rerunning a stage after
a killed driver keeps the shards that were written and computes the rest.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from genstress_ray.data import DatasetSource, Shard
from genstress_ray.progress import StageProgress
from genstress_ray.storage import RunStore

log = logging.getLogger(__name__)


def table_bytes(table: pa.Table) -> bytes:
    """An Arrow table as IPC stream bytes (how a shard's rows travel in a Ray Data row)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def bytes_table(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def read_shards(batch: dict[str, np.ndarray], source: DatasetSource) -> dict[str, list]:
    """Ray Data task: fetch and decode the shards of ``batch`` (their index rows) into source rows."""
    rows, counts = [], []
    for name, index in zip(batch["shard"], batch["rows"]):
        index = bytes_table(index)
        table, read = source.read_shard(Shard(str(name), index.num_rows, index))
        rows.append(table_bytes(table))
        counts.append(json.dumps(read))
    return {"shard": list(batch["shard"]), "rows": rows, "counts": counts}


def run_sharded(store: RunStore, stage: str, shards: list[Shard], stage_cls, resources, constructor: dict,
                source: DatasetSource | None = None, progress=None) -> dict[str, Any]:
    """Compute the ``shards`` not yet written into ``stage`` with ``stage_cls`` actors and return the
    stage's totals over every shard, with ``shards``, ``shards_computed`` and ``shards_reused``.

    ``source``: a streaming source whose index rows ``shards`` hold (read by Ray tasks); None when the
    shards already hold their source rows. Call ``store.resume_stage`` (or ``begin_stage``) first.
    """
    done = store.shard_files(stage)
    todo = [s for s in shards if s.name not in done]
    if done:
        log.info("stage %s: %d of %d shards already written, computing %d", stage, len(shards) - len(todo),
                 len(shards), len(todo))
    if todo:
        items = [{"shard": s.name, "rows": table_bytes(s.rows), "counts": "{}"} for s in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        if source is not None:
            ds = ds.map_batches(read_shards, batch_size=1, batch_format="numpy", fn_kwargs={"source": source},
                                num_cpus=resources.read_cpus)
        ds = ds.map_batches(stage_cls, batch_size=1, batch_format="numpy", **resources.ray_args(),
                            fn_constructor_kwargs={**constructor, "threads": resources.torch_threads(),
                                                   "chunk_size": resources.chunk_size, "stage": stage,
                                                   "output": store.uri, "storage_options": store.storage_options,
                                                   "rows_per_call": resources.batch_size})
        rows_done = [0]
        with StageProgress(stage, sum(s.size for s in todo), lambda: rows_done[0], progress):
            for summary in ds.iter_rows():
                rows_done[0] += int(summary["rows"])
    totals = store.shard_counts(stage, [s.name for s in shards])
    return {**totals, "shards": len(shards), "shards_computed": len(todo), "shards_reused": len(shards) - len(todo)}
