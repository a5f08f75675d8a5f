"""LLM counterfactuals with ControlNet on Ray Data: each actor holds the captioner, the counterfactual
writer (the offline lexicons, or a client of a chat-completions endpoint), the Stable Diffusion +
ControlNet pipeline and the classifier, and turns batches of search images into scored candidates
(``strategies.counterfactual``).

A row's ``params`` carries what it was made from: the source's caption, the counterfactual text, the
edited words, the control type and the image's generator seed, with ``flipped`` (the prediction
differs from the one on the source image) and how well it kept the layout (edge agreement, SSIM).
Sources the classifier already gets wrong make no candidates; they are counted
(``sources_misclassified``).
Captions whose writer gave no valid answer are counted (``rewrites_invalid``) and the first few are
kept with their error and last answer in the stage's counts. With ``strategy.llm_processor`` the
captions were written before the search, through Ray Data's LLM processor (``stages.rewrites``), and
the actors read them from the run's ``rewrites`` table instead of calling the writer.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from genstress_ray.stages.base import ModelStage, candidate_table
from genstress_ray.stages.rewrites import stored_rewrites
from genstress_ray.storage import SAMPLES_SCHEMA, sample_id
from genstress_ray.strategies.counterfactual import build_search


class CounterfactualStage(ModelStage):
    """Counterfactual search on a batch of search images (``source_id``, ``source_label``, ``image``)."""

    def __init__(self, *args, params: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.params = params

    def _load(self) -> None:
        super()._load()
        if self.device.type == "cuda":
            self.generator.half()  # fp16 on the GPU; the classifier stays in float32
        self.search = build_search(self.params, self.generator, self.classifier, self.class_names, str(self.device))
        # Written for every source before the search (strategy.llm_processor), else here, per batch.
        self.rewrites = stored_rewrites(self.store) if self.params.get("llm_processor") else None

    def process_batch(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = [str(s) for s in batch["source_id"]]
        labels = np.asarray(batch["source_label"], np.int64)
        raw = np.frombuffer(b"".join(batch["image"]), np.uint8).reshape(len(ids), *self.image_shape)
        masks = self._masks(batch) if "mask" in batch else None  # a segmentation data set's
        found, rewrites = self.search.search(raw, labels, ids, self.seed, masks,
                                             None if self.rewrites is None else [self.rewrites[s] for s in ids])
        invalid = [(ids[i], r) for i, r in enumerate(rewrites) if not r.valid]
        fault = found.scores["fault"]
        self._count({"candidates": len(found), "faults": int(fault.sum()), "generator_calls": len(found),
                     "flipped": int(found.flipped.sum()), "sources": len(ids),
                     "sources_misclassified": found.skipped,
                     "counterfactual_texts": found.texts,
                     "llm_calls": sum(r.calls for r in rewrites), "rewrites_invalid": len(invalid),
                     "rewrites_invalid_first": [f"{sid}: {r.error}; last answer: {r.answer[:200]!r}"
                                                for sid, r in invalid]})
        keep = fault if self.params["keep"] == "faults" else torch.ones_like(fault)
        idx = keep.nonzero().squeeze(1)
        rows = idx.tolist()
        if not rows:
            return SAMPLES_SCHEMA.empty_table()
        columns = {
            "sample_id": [sample_id("counterfactual", self.seed, ids[found.source[i]], found.draw[i]) for i in rows],
            "source_id": [ids[found.source[i]] for i in rows],
            "source_label": labels[found.source[rows]],
            "strategy": ["counterfactual"] * len(rows),
            "params": [found.params(i, rewrites, self.params["control"]) for i in rows],
            "draw": found.draw[rows],
            "seed": np.full(len(rows), self.seed, np.int64),
        }
        return candidate_table(SAMPLES_SCHEMA, columns, found.latents[idx], found.images[idx],
                               {k: v[idx] for k, v in found.scores.items()})
