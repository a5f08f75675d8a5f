"""What every Ray Data stage shares: counters, the model-holding base class, the Arrow output.
Models are referenced and loaded through ``genstress_ray.models.refs`` (no Ray there)."""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from genstress_ray.data import png_bytes, to_uint8
from genstress_ray.metrics import score_boundary, score_logits
from genstress_ray.models.refs import ModelRef, load_classifier, load_generator
from genstress_ray.stages.shards import bytes_table
from genstress_ray.storage import LAYOUT, RunStore, write_shard


def candidate_table(schema: pa.Schema, columns: dict[str, Any], latents: torch.Tensor, images: torch.Tensor,
                    scores: dict[str, torch.Tensor]) -> pa.Table:
    """Assemble kept candidates into an Arrow table of ``schema`` (PNG-encoding each image)."""
    pixels = to_uint8(images)
    d, k = latents.shape[1], scores["probs"].shape[1]
    data = {
        **columns,
        "latent": pa.FixedSizeListArray.from_arrays(latents.float().cpu().numpy().ravel(), d).cast(pa.list_(pa.float32())),
        "image": [png_bytes(p) for p in pixels],
        "probs": pa.FixedSizeListArray.from_arrays(scores["probs"].float().cpu().numpy().ravel(), k).cast(pa.list_(pa.float32())),
        **{name: scores[name].cpu().numpy() for name in ("pred", "fault", "kldb", "entropy", "margin")},
    }
    return pa.table({name: data[name] for name in schema.names}, schema=schema)


class ModelStage:
    """Holds classifier and generator, on the GPU when the actor was given one, and computes shards.

    Each call gets whole shards (``genstress_ray.stages.shards``): their source rows go through
    ``process_batch`` ``rows_per_call`` at a time, and the shard's rows and counts are written as its
    one file under ``output`` (the run's URI), stage ``stage``.

    Models load on the first batch, on the thread that runs the batches. Ray Data constructs the
    UDF on the actor's main thread but calls it from another one; torch work on both gives the
    process two OpenMP thread teams on the same cores, and libgomp then throttles its spin-waiting,
    which cost about 7% per batch on 2 cores. (The driver has already loaded and checked both
    models before any Ray work starts, so a bad checkpoint still fails early.)
    """

    def __init__(self, classifier: ModelRef, generator: ModelRef, class_names: list[str], image_shape,
                 seed: int, output: str | None = None, stage: str | None = None, threads: int = 1,
                 chunk_size: int = 512, rows_per_call: int = 64, storage_options: dict | None = None,
                 generator_kind: str = "latent_generator",
                 boundary: dict | None = None, strategy: str = "defuse", segmentation: dict | None = None):
        self.refs, self.generator_kind, self.strategy = (classifier, generator), generator_kind, strategy
        # A segmentation model under test: {"miou_drop": its fault threshold}; rows carry the masks.
        self.segmentation = segmentation
        # KLDB runs: {"subset": class indices of C, "threshold": boundary_kldb, "temperature": T}. Their
        # candidates are scored against C (``score_boundary``), the region samples' too.
        self.boundary = boundary
        self.class_names, self.image_shape, self.seed = class_names, tuple(image_shape), seed
        self.threads, self.chunk_size, self.rows_per_call = threads, chunk_size, rows_per_call
        self.store = RunStore.from_uri(output, storage_options) if output else None
        self.stage = stage
        self._pending: Counter = Counter()  # this shard's totals, see __call__
        self.classifier = self.generator = None

    def _load(self) -> None:
        torch.set_num_threads(self.threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        self.classifier = load_classifier(self.refs[0], self.class_names, self.image_shape).to(self.device)
        self.generator = load_generator(self.refs[1], self.image_shape, self.generator_kind,
                                        len(self.class_names)).to(self.device)
        if self.boundary is not None:
            self.subset = torch.zeros(len(self.class_names), dtype=torch.bool, device=self.device)
            self.subset[self.boundary["subset"]] = True
            self.temperature = float(self.boundary.get("temperature") or 1.0)

    def _scores(self, logits: torch.Tensor, intended: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ``samples`` columns for ``logits``: against the intended class, or against C in a KLDB run
        (logits already divided by the calibration temperature)."""
        if self.boundary is None:
            return score_logits(logits, intended)
        return score_boundary(logits, self.subset, self.boundary["threshold"])

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(images.float())
        return logits if self.boundary is None else logits / self.temperature

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        if self.classifier is None:
            self._load()
        sizes = []
        for name, payload, read_counts in zip(batch["shard"], batch["rows"], batch["counts"]):
            started = time.time()
            rows = bytes_table(payload)
            table = self._compute(rows)
            counts = {**json.loads(read_counts), **self._pending}  # read counts: images skipped
            made_by = {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                       "device": str(self.device), "seconds": round(time.time() - started, 3)}
            write_shard(self.store.fs, self.store.shard_path(self.stage, str(name)), table, counts, made_by)
            sizes.append(rows.num_rows)
        return {"shard": list(batch["shard"]), "rows": sizes}

    def _compute(self, rows: pa.Table) -> pa.Table:
        """One shard's output rows, ``rows_per_call`` source rows at a time; its totals in ``_pending``."""
        self._pending = Counter()
        parts = [self.process_batch({c: v.to_numpy(zero_copy_only=False) for c, v in zip(part.column_names, part.columns)})
                 for part in (rows.slice(i, self.rows_per_call) for i in range(0, rows.num_rows, self.rows_per_call))]
        return pa.concat_tables(parts) if parts else LAYOUT[self.stage].schema.empty_table()

    def run_batch(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """One batch of source rows computed in this process, nothing written (tests, benchmarks)."""
        if self.classifier is None:
            self._load()
        self._pending = Counter()
        return self.process_batch(batch)

    def process_batch(self, batch: dict[str, np.ndarray]) -> pa.Table:
        raise NotImplementedError

    def _masks(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """The batch's ``mask`` column as uint8 (N, H, W) label maps."""
        return np.frombuffer(b"".join(batch["mask"]), np.uint8).reshape(len(batch["mask"]), *self.image_shape[1:])

    def _count(self, counts: dict[str, int]) -> None:
        """Add to this shard's totals (stored in its file)."""
        self._pending.update(counts)

    @torch.no_grad()
    def _decode_and_score(self, latents: torch.Tensor, intended: torch.Tensor):
        # Forward passes of ``chunk_size`` candidates: on CPUs small chunks stay in cache and run
        # faster than one huge batch (128 was best on 2 cores); on GPUs a large chunk is better.
        images = [self.generator.decode(z) for z in latents.split(self.chunk_size)]
        logits = [self._logits(im) for im in images]
        images = torch.cat(images).float() if images else latents.new_zeros((0, *self.image_shape))
        logits = torch.cat(logits) if logits else latents.new_zeros((0, len(self.class_names)))
        scores = self._scores(logits, intended)
        finite = (torch.isfinite(latents).all(1) & torch.isfinite(images).flatten(1).all(1)
                  & torch.isfinite(logits).all(1))
        return images, scores, finite
