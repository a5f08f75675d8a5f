"""Random truncation and latent code mixing on Ray Data, over a list of seeds.

A batch holds seeds (``source_id`` "seed:<i>", ``source_label`` its class, or -1 when the generator is
unconditional); each seed's codes come from its own stream (``strategies.seed_codes``), so results are
the same for a given seed list and config however the seeds are batched or spread over actors. A
candidate's latent is its styles, ws flattened, which the regions stage clusters and ``decode`` turns
back into images. Every candidate records the intended (seed) class: a fault is a prediction other
than it.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import torch

from genstress_ray.data import to_float, to_uint8
from genstress_ray.metrics import score_logits
from genstress_ray.stages.base import ModelStage, candidate_table
from genstress_ray.storage import SAMPLES_SCHEMA, sample_id
from genstress_ray.strategies import (boundary_search, clip_codes, default_layer_sets, layer_masks, mix_styles,
                                      runner_up_classes, seed_codes, truncate, truncation_plan)


class _StyleSearch(ModelStage):
    def __init__(self, *args, params: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.params = params

    def _seeds(self, batch: dict[str, np.ndarray]) -> tuple[list[str], torch.Tensor]:
        return [str(s) for s in batch["source_id"]], torch.tensor(np.asarray(batch["source_label"], np.int64))

    @torch.no_grad()
    def _classify_styles(self, ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and CPU logits for styles ``ws`` (one generator call each), ``chunk_size`` at a time."""
        images = torch.cat([self.generator.synthesis(w) for w in ws.split(self.chunk_size)])
        logits = torch.cat([self.classifier(x) for x in images.split(self.chunk_size)]).cpu()
        return images, logits

    def _classify_codes(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits of the images of codes ``z`` with conditioning ``labels`` (one generator call each)."""
        ws = self.generator.mapping(z.to(self.device), self.generator.one_hot(labels.to(self.device)))
        return self._classify_styles(ws)[1]

    def _table(self, strategy: str, ids: list[str], rows: torch.Tensor, draws: torch.Tensor, intended: torch.Tensor,
               params: list[str], latents: torch.Tensor, images: torch.Tensor, scores: dict) -> pa.Table:
        columns = {
            "sample_id": [sample_id(strategy, self.seed, ids[r], d) for r, d in zip(rows.tolist(), draws.tolist())],
            "source_id": [ids[r] for r in rows.tolist()],
            "source_label": intended.cpu().numpy(),
            "strategy": [strategy] * len(rows),
            "params": params,
            "draw": draws.numpy(),
            "seed": np.full(len(rows), self.seed, np.int64),
        }
        return candidate_table(SAMPLES_SCHEMA, columns, latents, images, scores)


class TruncationSearch(_StyleSearch):
    """``budget_calls`` samples of each seed's class: code 0 is the seed's own, the rest further draws
    of its stream; each is truncated by its psi and, at random, clipped. An unconditional generator's
    seed class is the classifier's prediction on the seed's untruncated image (one more call)."""

    def process_batch(self, batch: dict[str, np.ndarray]) -> pa.Table:
        p = self.params
        ids, labels = self._seeds(batch)
        n, q = len(ids), p["budget_calls"]
        z = seed_codes(ids, self.generator.z_dim, q, self.seed)
        intended = labels
        calls = n * q
        if not self.generator.c_dim:
            intended = self._classify_codes(z[:, 0], labels).argmax(1)
            calls += n
        psi, bound = truncation_plan(ids, q, p["psi"], p["clip_range"], p["clip_probability"], self.seed)
        codes = clip_codes(z.reshape(n * q, -1), bound.reshape(-1))
        cls = intended.repeat_interleave(q)
        with torch.no_grad():
            ws = self.generator.mapping(codes.to(self.device), self.generator.one_hot(cls.to(self.device)))
            latents = truncate(ws, self.generator.w_avg, psi.reshape(-1).to(self.device)).flatten(1)
        images, scores, finite = self._decode_and_score(latents, cls.to(self.device))
        fault = scores["fault"].cpu() & finite.cpu()
        keep = fault if p["keep"] == "faults" else finite.cpu()
        self._count({"candidates": n * q, "generator_calls": calls, "faults": int(fault.sum()),
                     "nonfinite_dropped": int((~finite).sum())})
        idx = keep.nonzero().squeeze(1)
        flat_psi, flat_bound = psi.reshape(-1), bound.reshape(-1)
        params = [json.dumps({"psi": round(float(flat_psi[i]), 6),
                              "clip": None if not np.isfinite(float(flat_bound[i])) else round(float(flat_bound[i]), 6)})
                  for i in idx.tolist()]
        idx_dev = idx.to(self.device)
        return self._table("truncation", ids, idx // q, idx % q, cls[idx], params, latents[idx_dev].cpu(),
                           images[idx_dev], {k: v[idx_dev] for k, v in scores.items()})


class MixingSearch(_StyleSearch):
    """Latent code mixing with a binary search to the decision boundary (see ``strategies.mixing``).

    Per seed: one call for the seed's image (seeds the classifier gets wrong are skipped); a target
    code for each of the ``top_k`` runner-up classes (an unconditional generator first spends
    ``target_tries`` calls looking for codes the classifier puts in those classes); then one search
    per (target, layer set), all seeds of the batch stepping together. A row is a search's result:
    the mixed image at the flipping end of its final bracket (a fault), or, with ``keep: all``, also
    the full-weight image of a search that never flipped.
    """

    def _load(self) -> None:
        super()._load()
        sets = self.params.get("layer_sets") or default_layer_sets(self.generator.num_ws)
        self.layer_sets = [list(map(int, s)) for s in sets]
        self.masks = layer_masks(self.layer_sets, self.generator.num_ws).to(self.device)

    def _target_codes(self, z: torch.Tensor, targets: torch.Tensor):
        """Styles (N, k, num_ws, w_dim) of a code per target class, whether each was found, and calls spent."""
        n, k = targets.shape
        g = self.generator
        if g.c_dim:
            codes = z[:, 1:1 + k].reshape(n * k, -1).to(self.device)
            ws = g.mapping(codes, g.one_hot(targets.reshape(-1).to(self.device)))
            return ws.reshape(n, k, *ws.shape[1:]), torch.ones(n, k, dtype=torch.bool), 0
        tries = self.params["target_tries"]
        codes = z[:, 1 + k:].reshape(n * tries, -1)
        pred = self._classify_codes(codes, torch.full((n * tries,), -1)).argmax(1).reshape(n, tries)
        match = pred[:, None, :] == targets[:, :, None]  # (n, k, tries)
        found = match.any(2)
        first = match.float().argmax(2)
        chosen = codes.reshape(n, tries, -1)[torch.arange(n)[:, None], first]  # (n, k, z_dim)
        ws = g.mapping(chosen.reshape(n * k, -1).to(self.device), g.one_hot(targets.reshape(-1).to(self.device)))
        return ws.reshape(n, k, *ws.shape[1:]), found, tries

    @torch.no_grad()
    def process_batch(self, batch: dict[str, np.ndarray]) -> pa.Table:
        p, g = self.params, self.generator
        started = time.monotonic()
        ids, labels = self._seeds(batch)
        n, k, sets = len(ids), p["top_k"], len(self.layer_sets)
        z = seed_codes(ids, g.z_dim, 1 + k + (0 if g.c_dim else p["target_tries"]), self.seed)
        seed_ws = g.mapping(z[:, 0].to(self.device), g.one_hot(labels.to(self.device)))
        seed_logits = self._classify_styles(seed_ws)[1]
        intended = labels if g.c_dim else seed_logits.argmax(1)
        correct = seed_logits.argmax(1) == intended
        targets = runner_up_classes(seed_logits, intended, k)
        target_ws, found, extra_calls = self._target_codes(z, targets)
        seed_of, target_of, set_of = _search_grid(correct, found, sets)
        out_latent = torch.zeros(len(seed_of), g.latent_dim)
        out_logits = torch.zeros(len(seed_of), len(self.class_names))
        out_images = torch.zeros(len(seed_of), *self.image_shape, dtype=torch.uint8)  # uint8: large images add up

        def probe(weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            s, t, m = seed_of[idx], target_of[idx], set_of[idx]
            ws = mix_styles(seed_ws[s.to(self.device)], target_ws[s.to(self.device), t.to(self.device)],
                            self.masks[m.to(self.device)], weights.to(self.device))
            images, logits = self._classify_styles(ws)
            flips = logits.argmax(1) != intended[s]
            record = flips | (weights == 1)  # the result is at the flipping end of the bracket
            out_latent[idx[record]] = ws.flatten(1).cpu()[record]
            out_logits[idx[record]] = logits[record]
            out_images[idx[record]] = torch.from_numpy(to_uint8(images[record.to(images.device)]))
            return flips

        budget = torch.full((n,), p["budget_calls"] - 1 - extra_calls)
        remaining_seconds = p["budget_seconds"] - (time.monotonic() - started)
        result = boundary_search(probe, seed_of, budget, p["max_iterations"], p["tolerance"], remaining_seconds)
        keep = result.flipped if p["keep"] == "faults" else result.probed
        idx = keep.nonzero().squeeze(1)
        timed_out = {int(seed_of[i]) for i, why in enumerate(result.stop) if why == "seconds"}
        self._count({"candidates": int(result.probed.sum()), "faults": int(result.flipped.sum()),
                     "generator_calls": int(result.calls.sum()) + n * (1 + extra_calls),
                     "bisection_steps": int(result.iterations.sum()),
                     "seeds_skipped": int((~correct).sum()), "targets_not_found": int((~found[correct]).sum()),
                     "searches_budget_stopped": result.stop.count("budget"), "seeds_timed_out": len(timed_out)})
        params = [json.dumps({"seed_class": int(intended[seed_of[i]]), "target_class": int(targets[seed_of[i], target_of[i]]),
                              "layers": self.layer_sets[int(set_of[i])], **result.record(i)}) for i in idx.tolist()]
        scores = score_logits(out_logits[idx], intended[seed_of[idx]])
        draws = target_of[idx] * sets + set_of[idx]
        return self._table("mixing", ids, seed_of[idx], draws, intended[seed_of[idx]], params, out_latent[idx],
                           to_float(out_images[idx].numpy()), scores)


def _search_grid(correct: torch.Tensor, found: torch.Tensor, sets: int):
    """(seed, target, layer set) of every search, in that order; seeds the classifier gets wrong and
    targets without a code have none."""
    n, k = found.shape
    grid = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(k), torch.arange(sets), indexing="ij"), -1)
    grid = grid.reshape(-1, 3)
    grid = grid[correct[grid[:, 0]] & found[grid[:, 0], grid[:, 1]]]
    return grid.unbind(1)
