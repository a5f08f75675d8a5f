"""Assess a run's search output: fault detection, diversity, validity, Frechet distance.

The definitions are in the README ("Metrics"); the functions are in ``metrics``. This module reads a
run's ``identify`` table and manifest, loads the run's models and the validity detector (a beta-VAE
trained on the real training split, cached like every built-in model), and writes
``assessment.json`` into the run.

Example:
    >>> summary = assess_run("genstress-runs/mnist-mixing/r1")  # doctest: +SKIP
    >>> summary["fault_detection"]["faults_per_call"], summary["validity"]["faults_valid"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from genstress_ray.config import load_config
from genstress_ray.data import to_float
from genstress_ray.data.sources import decode_images
from genstress_ray.metrics import (distinct_class_pairs, fault_detection, frechet_distance, mean_pairwise_distance,
                                   penultimate_features, reconstruction_error, ssim)
from genstress_ray.pipeline import load_split, model_ref, prepare_model
from genstress_ray.stages import load_classifier, load_generator
from genstress_ray.storage import RunStore, write_bytes_atomic
from genstress_ray.strategies import seed_codes

log = logging.getLogger(__name__)
ASSESSMENT = "assessment.json"


def _faults(store: RunStore, limit: int, seed: int):
    table = store.read_table("identify", columns=["source_id", "source_label", "pred", "image", "params"],
                             filter=pc.field("fault"))
    if table.num_rows > limit:
        keep = np.sort(np.random.default_rng(seed).choice(table.num_rows, limit, replace=False))
        table = table.take(keep)
    return table


@torch.no_grad()
def seed_images(generator, source_ids: list[str], labels: torch.Tensor, seed: int) -> torch.Tensor:
    """The untouched image of each seed (code 0 of its stream, its class), as the search made it."""
    z = seed_codes(source_ids, generator.z_dim, 1, seed)[:, 0]
    return generator.synthesis(generator.mapping(z, generator.one_hot(labels)))


def assess_run(run_uri: str, storage_options: dict | None = None, overrides: dict | None = None) -> dict[str, Any]:
    """Measure a run's ``identify`` output and write ``assessment.json`` into the run.

    ``overrides`` replace fields of the config's ``assessment`` section (``{"quantile": 0.95}``).
    Returns the summary that was written.
    """
    started = time.time()
    store = RunStore.from_uri(run_uri, storage_options)
    manifest = store.read_manifest()
    raw = dict(manifest["config"])
    raw["assessment"] = {**raw.get("assessment", {}), **(overrides or {})}
    cfg = load_config(raw)
    if not store.is_complete("identify"):
        raise ValueError(f"run {store.uri}: the identify stage is not complete; run the campaign first")
    a = cfg.assessment
    class_names, image_shape = manifest["class_names"], tuple(manifest["image_shape"])
    counts = store.marker("identify")
    search = load_split(cfg.data.search)
    classifier = load_classifier(model_ref(cfg.classifier, manifest["models"]["classifier"]), class_names, image_shape)
    detector = load_generator(prepare_model("detector", a.detector, cfg, search), image_shape)
    real = load_split(cfg.data.validation_spec())
    real_x = to_float(real.images)

    faults = _faults(store, a.max_faults, cfg.seed)
    fault_x = to_float(decode_images(faults["image"].to_pylist(), faults["source_id"].to_pylist(), None)) \
        if faults.num_rows else torch.zeros(0, *image_shape)
    intended = torch.tensor(faults["source_label"].to_numpy(zero_copy_only=False), dtype=torch.long)
    pred = torch.tensor(faults["pred"].to_numpy(zero_copy_only=False), dtype=torch.long)

    real_features = penultimate_features(classifier.net, real_x)
    fault_features = penultimate_features(classifier.net, fault_x)
    real_error = reconstruction_error(detector, real_x)
    threshold = float(torch.quantile(real_error.double(), a.quantile))
    fault_error = reconstruction_error(detector, fault_x)
    candidates, calls = counts.get("candidates", 0), counts.get("generator_calls", counts.get("candidates", 0))
    summary: dict[str, Any] = {
        "run": store.uri, "strategy": cfg.strategy.name, "candidates": candidates, "generator_calls": calls,
        "faults": counts.get("faults", 0), "faults_assessed": faults.num_rows,
        "fault_detection": fault_detection(counts.get("faults", 0), candidates, calls),
        "diversity": {"mean_pairwise_feature_distance": mean_pairwise_distance(fault_features, seed=cfg.seed),
                      "distinct_class_pairs": distinct_class_pairs(intended, pred)},
        "validity": {"detector": "beta-VAE reconstruction error", "quantile": a.quantile, "threshold": threshold,
                     "real_valid": float((real_error <= threshold).float().mean()),
                     "faults_valid": float((fault_error <= threshold).float().mean()) if len(fault_error) else float("nan")},
        "frechet_distance": frechet_distance(fault_features, real_features),
        "real_images": len(real),
    }
    if cfg.strategy.name == "mixing" and faults.num_rows:
        generator = load_generator(model_ref(cfg.generator, manifest["models"]["generator"]), image_shape,
                                   cfg.strategy.generator_kind, len(class_names))
        params = [json.loads(p) for p in faults["params"].to_pylist()]
        seed_classes = torch.tensor([p["seed_class"] for p in params])
        originals = seed_images(generator, faults["source_id"].to_pylist(), seed_classes, cfg.seed)
        summary["validity"]["ssim_to_seed"] = float(ssim(fault_x, originals).mean())
        iterations = np.array([p["iterations"] for p in params])
        summary["bisection"] = {"mean_iterations": float(iterations.mean()), "median_iterations": float(np.median(iterations)),
                                "max_iterations": int(iterations.max()),
                                "searches_budget_stopped": counts.get("searches_budget_stopped", 0),
                                "seeds_skipped": counts.get("seeds_skipped", 0)}
    summary["seconds"] = round(time.time() - started, 3)
    write_bytes_atomic(store.fs, f"{store.path}/{ASSESSMENT}", json.dumps(summary, indent=2).encode())
    return summary
