"""Defuse on Ray Data: Beta-noise identification, and decoding of latents sampled from regions."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from genstress_ray.data import to_float
from genstress_ray.stages.base import ModelStage, candidate_table
from genstress_ray.storage import REGION_SAMPLES_SCHEMA, SAMPLES_SCHEMA, sample_id
from genstress_ray.strategies import beta_noise, perturb_latents, select_candidates


class DefuseSearch(ModelStage):
    """Defuse identification on a batch of source images (``source_id``, ``source_label``, ``image``).

    Every image gets ``draws`` Beta-noise latents; the kept candidates (faults, or all) become rows.
    """

    def __init__(self, *args, params: dict[str, Any], **kwargs):
        super().__init__(*args, **kwargs)
        self.params = params
        self.params_json = json.dumps({k: params[k] for k in ("a", "b", "centred", "only_correct_reconstructions")})

    def process_batch(self, batch: dict[str, np.ndarray]) -> pa.Table:
        p = self.params
        ids = [str(s) for s in batch["source_id"]]
        labels = torch.tensor(np.asarray(batch["source_label"], np.int64))
        raw = np.frombuffer(b"".join(batch["image"]), np.uint8).reshape(len(ids), *self.image_shape)
        q = p["draws"]
        with torch.no_grad():
            mean, _ = self.generator.encode(to_float(raw).to(self.device))
            if p.get("only_correct_reconstructions"):
                # The generator's failures, not the classifier's: their draws are never decoded.
                seed_ok = (self.classifier(self.generator.decode(mean)).argmax(1).cpu() == labels)
            else:
                seed_ok = torch.ones(len(ids), dtype=torch.bool)
        skipped = int((~seed_ok).sum())
        kept = seed_ok.nonzero().squeeze(1)
        ids, labels, mean = [ids[i] for i in kept.tolist()], labels[kept], mean[kept.to(mean.device)]
        n = len(ids)
        noise = beta_noise(ids, mean.shape[1], q, p["a"], p["b"], self.seed, p["centred"])
        latents = perturb_latents(mean.cpu(), noise).reshape(n * q, mean.shape[1])
        intended = labels.repeat_interleave(q)
        images, scores, finite = self._decode_and_score(latents.to(self.device), intended.to(self.device))
        finite = finite.cpu()
        fault = scores["fault"].cpu() & finite
        scores["fault"] = fault.to(scores["fault"].device)
        if p["keep"] == "all":
            keep = finite
        else:
            keep = select_candidates(fault.view(n, q), noise.norm(dim=2), p["max_faults_per_image"]).reshape(-1)
        self._count({"candidates": n * q, "faults": int(fault.sum()), "nonfinite_dropped": int((~finite).sum()),
                     "seeds_skipped": skipped})
        idx = keep.nonzero().squeeze(1)
        rows, draws = idx // q, idx % q
        columns = {
            "sample_id": [sample_id("defuse", self.seed, ids[r], d) for r, d in zip(rows.tolist(), draws.tolist())],
            "source_id": [ids[r] for r in rows.tolist()],
            "source_label": labels[rows].numpy(),
            "strategy": ["defuse"] * len(idx),
            "params": [self.params_json] * len(idx),
            "draw": draws.numpy(),
            "seed": np.full(len(idx), self.seed, np.int64),
        }
        idx_dev = idx.to(self.device)
        kept_scores = {k: v[idx_dev] for k, v in scores.items()}
        return candidate_table(SAMPLES_SCHEMA, columns, latents[idx], images[idx_dev], kept_scores)


class RegionDecode(ModelStage):
    """Decode and classify latents sampled from regions (``region_id``, ``draw``, ``latent``,
    ``source_label`` = the region's dominant source class, which a fault is judged against)."""

    def process_batch(self, batch: dict[str, np.ndarray]) -> pa.Table:
        latents = torch.from_numpy(np.stack(batch["latent"]).astype(np.float32))
        region = np.asarray(batch["region_id"], np.int64)
        draw = np.asarray(batch["draw"], np.int64)
        labels = torch.tensor(np.asarray(batch["source_label"], np.int64))
        if self.segmentation:
            images, scores, finite, params = self._segmented(batch, latents, labels)
        else:
            images, scores, finite = self._decode_and_score(latents.to(self.device), labels.to(self.device))
            params = [{} for _ in draw]
        keep = finite.cpu()
        self._count({"candidates": len(draw), "nonfinite_dropped": int((~keep).sum())})
        idx = keep.nonzero().squeeze(1)
        sel = idx.numpy()
        columns = {
            "sample_id": [sample_id("region", self.seed, r, d) for r, d in zip(region[sel], draw[sel])],
            "source_id": [f"region:{r}" for r in region[sel]],
            "source_label": labels[idx].numpy(),
            "strategy": [self.strategy] * len(sel),  # the run's strategy; region_id marks a region sample
            "params": [json.dumps({"region_id": int(region[i]), **params[i]}) for i in sel],
            "draw": draw[sel], "seed": np.full(len(sel), self.seed, np.int64), "region_id": region[sel],
        }
        idx_dev = idx.to(self.device)
        return candidate_table(REGION_SAMPLES_SCHEMA, columns, latents[idx], images[idx_dev],
                               {k: v[idx_dev] for k, v in scores.items()})

    @torch.no_grad()
    def _segmented(self, batch: dict[str, np.ndarray], latents: torch.Tensor, labels: torch.Tensor):
        """A segmentation model's scores of region samples: each sample has no source of its own, so
        it is scored against its anchor, the region's nearest fault's source image and mask
        (``pipeline.segmentation_anchors``)."""
        from genstress_ray.strategies.counterfactual import segmentation_scores

        dev, n = self.device, len(labels)
        images = torch.cat([self.generator.decode(z.to(dev)).float() for z in latents.split(self.chunk_size)])
        source_x = to_float(np.frombuffer(b"".join(batch["anchor_image"]), np.uint8).reshape(n, *self.image_shape))
        scores, _, extra = segmentation_scores(self.classifier, source_x.to(dev), images,
                                               torch.from_numpy(self._masks(batch)).long().to(dev), labels.to(dev),
                                               torch.arange(n, device=dev), self.segmentation["miou_drop"])
        finite = torch.isfinite(latents).all(1).to(dev) & torch.isfinite(images).flatten(1).all(1)
        anchors = [str(a) for a in batch["anchor_id"]]
        return images, scores, finite, [{"anchor": a, **e} for a, e in zip(anchors, extra)]
