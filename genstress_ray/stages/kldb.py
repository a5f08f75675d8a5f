"""KLDB-guided diffusion on Ray Data: one source row per (seed, alpha, beta) of the sweep.

Each row's initial noise comes from its seed's own stream (``strategies.seed_noise``), so every grid
point starts from the same noises and results do not depend on batching or actors. A batch samples
all its rows together, each with its own KLDB step alpha and guidance scale beta. A sample's latent
is its final denoised latent (the image itself for the pixel model, the VAE latent for Stable
Diffusion), which the regions stage clusters and ``decode`` turns back into an image. Samples have
no intended class (``source_label`` -1): KLDB and the margin are measured against the boundary's
classes C, and ``fault`` marks a sample on the boundary.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import torch

from genstress_ray.stages.base import ModelStage, candidate_table
from genstress_ray.storage import SAMPLES_SCHEMA, sample_id
from genstress_ray.strategies import seed_noise
from genstress_ray.strategies.guided_diffusion import guided_sample, make_scheduler


class KldbSearch(ModelStage):
    """Guided sampling toward the boundary C (``boundary["subset"]``, class indices) for a batch of rows
    (``source_id`` "seed:<i>", ``alpha``, ``beta``, ``draw`` = the grid point's index)."""

    def __init__(self, *args, params: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.params = params

    def _load(self) -> None:
        super()._load()
        p = self.params
        if self.device.type == "cuda":
            self.generator.half()  # fp16 on the GPU; the classifier and KLDB stay in float32
        self.generator.condition(self.boundary["subset"], self.class_names, p["prompt"], p["negative_prompt"])

    def process_batch(self, batch: dict[str, np.ndarray]) -> pa.Table:
        p = self.params
        ids = [str(s) for s in batch["source_id"]]
        alphas, betas = np.asarray(batch["alpha"], np.float64), np.asarray(batch["beta"], np.float64)
        alpha, beta = torch.tensor(alphas, dtype=torch.float32), torch.tensor(betas, dtype=torch.float32)
        draw = np.asarray(batch["draw"], np.int64)
        dtype = next(self.generator.parameters()).dtype
        noise = seed_noise(ids, self.generator.latent_shape, self.seed).to(self.device, dtype)
        latents, images, moved = guided_sample(
            self.generator.noise_pred, make_scheduler(p["scheduler"], self.generator.scheduler_config), noise,
            self.generator.decode, self._logits, self.subset, alpha, beta, p["steps"], p["guidance_every"])
        with torch.no_grad():
            logits = torch.cat([self._logits(x) for x in images.split(self.chunk_size)])
        scores = self._scores(logits, None)
        flat = latents.flatten(1).float()
        finite = torch.isfinite(flat).all(1) & torch.isfinite(logits).all(1)
        keep = finite & (scores["fault"] if p["keep"] == "boundary" else True)
        guided = int((alpha > 0).sum())
        self._count({"candidates": len(ids), "faults": int((scores["fault"] & finite).sum()),
                     "nonfinite_dropped": int((~finite).sum()), "generator_calls": len(ids) * p["steps"],
                     "guidance_steps": int(moved.sum()),
                     "guidance_skipped": guided * len(range(0, p["steps"], p["guidance_every"])) - int(moved.sum())})
        idx = keep.cpu().nonzero().squeeze(1)
        rows = idx.tolist()
        schedule = {k: p[k] for k in ("steps", "guidance_every", "scheduler", "classes")}
        columns = {
            "sample_id": [sample_id("kldb", self.seed, ids[r], draw[r]) for r in rows],
            "source_id": [ids[r] for r in rows],
            "source_label": np.full(len(rows), -1, np.int64),
            "strategy": ["kldb"] * len(rows),
            "params": [json.dumps({"alpha": float(alphas[r]), "beta": float(betas[r]), "moved": int(moved[r]),
                                   **schedule}) for r in rows],
            "draw": draw[rows] if rows else np.zeros(0, np.int64),
            "seed": np.full(len(rows), self.seed, np.int64),
        }
        dev = idx.to(self.device)
        return candidate_table(SAMPLES_SCHEMA, columns, flat[dev], images[dev].float(),
                               {k: v[dev] for k, v in scores.items()})
