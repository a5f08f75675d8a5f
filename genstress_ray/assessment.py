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

from genstress_ray.data import to_float
from genstress_ray.data.sources import decode_images
from genstress_ray.metrics import (class_subset, distinct_class_pairs, entropy, fault_detection, frechet_distance,
                                   kldb, mean_pairwise_distance, penultimate_features, reconstruction_error, ssim,
                                   text_diversity, top_in_subset)
from genstress_ray.context import RunContext, load_split, model_ref
from genstress_ray.models import load_generator
from genstress_ray.registry import resolve
from genstress_ray.storage import RunStore
from genstress_ray.strategies import seed_codes

log = logging.getLogger(__name__)


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


def assess_run(run_uri: str, storage_options: dict | None = None, overrides: dict | None = None,
               config=None) -> dict[str, Any]:
    """Measure a run's ``identify`` output and write ``assessment.json`` into the run.

    ``overrides`` replace fields of the config's ``assessment`` section (``{"quantile": 0.95}``);
    ``config`` is the campaign's own config, needed when the run names code to import
    (``genstress_ray.runs.run_config``). Returns the summary that was written.
    """
    started = time.time()
    ctx = RunContext.open(run_uri, config, storage_options, {"assessment": overrides} if overrides else None)
    if not ctx.store.is_complete("identify"):
        raise ValueError(f"run {ctx.store.uri}: the identify stage is not complete; run the campaign first")
    summary = {"run": ctx.store.uri, "strategy": ctx.cfg.strategy.name,
               **resolve(ctx.strategy.assess)(ctx, ctx.classifier())}
    summary["seconds"] = round(time.time() - started, 3)
    ctx.store.write_json("assessment", summary)
    return summary


def _fault_images(ctx: RunContext):
    """The assessed faults (a seeded sample of at most ``max_faults``) and their images as floats."""
    faults = _faults(ctx.store, ctx.cfg.assessment.max_faults, ctx.cfg.seed)
    fault_x = to_float(decode_images(faults["image"].to_pylist(), faults["source_id"].to_pylist(), None)) \
        if faults.num_rows else torch.zeros(0, *ctx.image_shape)
    return faults, fault_x


def assess_search(ctx: RunContext, classifier, faults=None) -> dict[str, Any]:
    """Fault detection, diversity, validity and Frechet distance of a search's faults (README, "Metrics").
    ``faults``: ``_fault_images(ctx)``, when the caller has read them already."""
    store, cfg, a = ctx.store, ctx.cfg, ctx.cfg.assessment
    counts = store.marker("identify")
    detector = load_generator(ctx.prepare("detector", a.detector), ctx.image_shape)
    real = load_split(cfg.data.validation_spec())
    real_x = to_float(real.images)
    faults, fault_x = faults or _fault_images(ctx)
    intended = torch.tensor(faults["source_label"].to_numpy(zero_copy_only=False), dtype=torch.long)
    pred = torch.tensor(faults["pred"].to_numpy(zero_copy_only=False), dtype=torch.long)

    real_features = penultimate_features(classifier.net, real_x)
    fault_features = penultimate_features(classifier.net, fault_x)
    real_error = reconstruction_error(detector, real_x)
    threshold = float(torch.quantile(real_error.double(), a.quantile))
    fault_error = reconstruction_error(detector, fault_x)
    candidates, calls = counts.get("candidates", 0), counts.get("generator_calls", counts.get("candidates", 0))
    summary: dict[str, Any] = {
        "candidates": candidates, "generator_calls": calls,
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
    return summary


def assess_mixing(ctx: RunContext, classifier) -> dict[str, Any]:
    """``assess_search``, plus how far each fault moved from its seed's image (SSIM) and how the
    bisection on the mixing weight went."""
    faults, fault_x = _fault_images(ctx)  # read and decoded once for both parts
    summary = assess_search(ctx, classifier, (faults, fault_x))
    if not faults.num_rows:
        return summary
    counts = ctx.store.marker("identify")
    params = [json.loads(p) for p in faults["params"].to_pylist()]
    seed_classes = torch.tensor([p["seed_class"] for p in params])
    originals = seed_images(ctx.generator(), faults["source_id"].to_pylist(), seed_classes, ctx.cfg.seed)
    summary["validity"]["ssim_to_seed"] = float(ssim(fault_x, originals).mean())
    iterations = np.array([p["iterations"] for p in params])
    summary["bisection"] = {"mean_iterations": float(iterations.mean()), "median_iterations": float(np.median(iterations)),
                            "max_iterations": int(iterations.max()),
                            "searches_budget_stopped": counts.get("searches_budget_stopped", 0),
                            "seeds_skipped": counts.get("seeds_skipped", 0)}
    return summary


def assess_counterfactual(ctx: RunContext, classifier) -> dict[str, Any]:
    """``assess_search``, plus what the counterfactual method adds: faults per language-model call,
    invalid rewrites, how often the prediction moved off the one on the source image, whether the
    layout was kept (edge agreement, SSIM to the source), diversity of the counterfactual texts and,
    when the config has an ``oracle``, the share of faults it still gives the source label (valid
    counterfactuals keep the label)."""
    faults, fault_x = _fault_images(ctx)
    summary = assess_search(ctx, classifier, (faults, fault_x))
    counts = ctx.store.marker("identify")
    calls = counts.get("llm_calls", 0)
    summary["fault_detection"]["faults_per_llm_call"] = counts.get("faults", 0) / calls if calls else float("nan")
    params = [json.loads(p) for p in faults["params"].to_pylist()]
    mean = (lambda key: float(np.mean([p[key] for p in params])) if params else float("nan"))
    summary["counterfactual"] = {
        "sources": counts.get("sources", 0), "sources_misclassified": counts.get("sources_misclassified", 0),
        "texts": counts.get("counterfactual_texts", 0), "llm_calls": calls,
        "rewrites_invalid": counts.get("rewrites_invalid", 0),
        "rewrites_invalid_first": counts.get("rewrites_invalid_first", []),
        "flip_rate": counts.get("flipped", 0) / counts["candidates"] if counts.get("candidates") else float("nan"),
        "fault_edge_agreement": mean("edge_agreement"), "fault_ssim_to_source": mean("ssim"),
        "fault_text_diversity": text_diversity(sorted({p["text"] for p in params}))}
    if ctx.segmentation:
        summary["segmentation"] = segmentation_summary(params, ctx.class_names, ctx.cfg.strategy.miou_drop)
    if ctx.cfg.oracle is not None and faults.num_rows:
        with torch.no_grad():
            oracle_pred = ctx.oracle()(fault_x).argmax(1).numpy()
        kept = oracle_pred == faults["source_label"].to_numpy(zero_copy_only=False)
        summary["validity"]["oracle_keeps_label"] = float(kept.mean())
    return summary


def segmentation_summary(params: list[dict], class_names: list[str], threshold: float) -> dict[str, Any]:
    """A segmentation model's faults: mIoU on their source images and on the faults, the drop, and
    per class (where present in the source's mask or either prediction) the mean IoU drop, worst first."""
    mean = (lambda key: float(np.mean([p[key] for p in params])) if params else float("nan"))
    per_class = {}
    for name in class_names:
        drops = [p["iou_drop"][name] for p in params if name in p["iou_drop"]]
        if drops:
            per_class[name] = {"mean_iou_drop": float(np.mean(drops)), "faults": len(drops)}
    worst_first = dict(sorted(per_class.items(), key=lambda kv: -kv[1]["mean_iou_drop"]))
    return {"miou_drop_threshold": threshold, "fault_miou_source": mean("miou_source"), "fault_miou": mean("miou"),
            "fault_miou_drop": mean("miou_drop"),
            "fault_miou_drop_median": float(np.median([p["miou_drop"] for p in params])) if params else float("nan"),
            "iou_drop_by_class": worst_first}


@torch.no_grad()
def boundary_scores(logits: torch.Tensor, subset: torch.Tensor) -> dict[str, float]:
    """Median KLDB, median entropy and the top-|C|-in-C rate of a set of samples' logits."""
    return {"median_kldb": float(kldb(logits, subset).median()), "median_entropy": float(entropy(logits).median()),
            "top_c_rate": float(top_in_subset(logits, subset).float().mean())}


def feature_extractor(cfg, classifier):
    """images -> features for the Frechet distance: ``assessment.features`` (e.g. Inception) when
    configured, else the classifier's penultimate features."""
    spec = cfg.assessment.features
    if spec is None:
        return lambda images: penultimate_features(classifier.net, images)
    net = model_ref(spec, spec.uri).load().eval()

    @torch.no_grad()
    def embed(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(x).flatten(1) for x in images.split(256)]) if len(images) else torch.zeros(0, 1)

    return embed


def assess_sweep(ctx: RunContext, classifier) -> dict[str, Any]:
    """Per (alpha, beta) of a KLDB sweep: median KLDB, median entropy, top-|C| rate and the Frechet
    distance (on the classifier's penultimate features) to real validation images of the classes in
    C; with an ``oracle`` in the config, KLDB and the top-|C| rate judged by it too (a classifier that
    never guided anything: a boundary only the guiding model sees is an adversarial artefact)."""
    store, cfg, class_names = ctx.store, ctx.cfg, ctx.class_names
    subset = class_subset(cfg.strategy.classes, class_names)
    table = store.read_table("identify", columns=["source_id", "image", "params", "fault", "probs"])
    images = to_float(decode_images(table["image"].to_pylist(), table["source_id"].to_pylist(), None))
    params = [json.loads(p) for p in table["params"].to_pylist()]
    points = np.array([(p["alpha"], p["beta"]) for p in params]).reshape(-1, 2)
    on_boundary = torch.from_numpy(table["fault"].to_numpy(zero_copy_only=False))  # KLDB <= boundary_kldb
    # The stored probabilities are the guiding classifier's (after any calibration temperature).
    guiding_logits = torch.from_numpy(np.stack(table["probs"].to_numpy(zero_copy_only=False))).clamp_min(1e-30).log() \
        if table.num_rows else torch.zeros(0, len(class_names))
    judge = ctx.oracle() if cfg.oracle is not None else None
    real = load_split(cfg.data.validation_spec())
    in_c = subset[torch.from_numpy(real.labels.astype(np.int64))]
    embed = feature_extractor(cfg, classifier)
    real_features, features = embed(to_float(real.images)[in_c]), embed(images)
    judged = torch.cat([judge(x) for x in images.split(1024)]) if judge is not None and len(images) else None
    rows = []
    for beta in sorted(set(points[:, 1].tolist())):
        for alpha in sorted(set(points[points[:, 1] == beta, 0].tolist())):
            mask = torch.from_numpy((points[:, 0] == alpha) & (points[:, 1] == beta))
            row = {"alpha": alpha, "beta": beta, "samples": int(mask.sum()),
                   **boundary_scores(guiding_logits[mask], subset),
                   "boundary_rate": float(on_boundary[mask].float().mean()),
                   "frechet_distance": frechet_distance(features[mask], real_features)}
            if judged is not None:
                row["independent"] = boundary_scores(judged[mask], subset)
            rows.append(row)
    return {"classes": list(cfg.strategy.classes), "candidates": table.num_rows, "real_images_in_c": int(in_c.sum()),
            "judge": "oracle" if judge is not None else None,
            "features": "assessment.features" if cfg.assessment.features else "classifier penultimate",
            "sweep": rows}
