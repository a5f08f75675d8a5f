"""Checks before a search that its result can mean something (README, "Guardrails").

Generator fidelity: Defuse searches around the generator's encodings of the search images, so every
candidate is a decode. When the classifier cannot recognise the generator's plain reconstructions of
real images, nearly every decode is "misclassified", and the regions found are regions of the
generator's blur, not of the classifier's failures (a GTSRB campaign with an under-trained VAE gave an
86% fault rate that way). So the classifier's accuracy on the reconstructions of a sample of search
images is measured first, refused below ``checks.min_fidelity`` unless accepted, and shown in the run
summary and the report.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import torch

from genstress_ray.context import RunContext
from genstress_ray.data import to_float
from genstress_ray.models import ModelError

log = logging.getLogger(__name__)


def sample_search_images(ctx: RunContext, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` search images (uint8 NCHW) and labels, a seeded sample read shard by shard, so a
    streaming source is read only as far as the sample needs."""
    source = ctx.search_source
    shards = source.shards(ctx.cfg.shard_rows)
    rng = np.random.default_rng([ctx.cfg.seed, 7])
    tables, rows = [], 0
    for i in rng.permutation(len(shards)):
        table, _ = source.read_shard(shards[i])
        tables.append(table.select(["source_label", "image"]))
        rows += table.num_rows
        if rows >= n:
            break
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows == 0:
        return np.zeros((0, *ctx.image_shape), np.uint8), np.zeros(0, np.int64)
    table = table.take(np.sort(rng.permutation(table.num_rows)[:n]))
    images = np.frombuffer(b"".join(table["image"].to_pylist()), np.uint8).reshape(-1, *ctx.image_shape)
    return images, table["source_label"].to_numpy().astype(np.int64)


def reconstruction_accuracy(generator, classifier, images: np.ndarray, labels: np.ndarray) -> float:
    """The classifier's accuracy on the generator's reconstructions (decoded latent means) of ``images``."""
    right = 0
    with torch.no_grad():
        for start in range(0, len(labels), 256):
            x = to_float(images[start: start + 256])
            mean, _ = generator.encode(x)
            right += int((classifier(generator.decode(mean)).argmax(1).numpy() == labels[start: start + 256]).sum())
    return right / len(labels) if len(labels) else float("nan")


def generator_fidelity(ctx: RunContext, generator) -> dict:
    """Measure the generator's fidelity for the run (``checks``) and refuse a run below the threshold.

    Returns what the manifest keeps: ``accuracy``, ``images``, ``min_fidelity``, ``accepted`` (or a
    ``message`` where the strategy does not search around reconstructions).

    Raises:
        ModelError: the accuracy is below ``checks.min_fidelity`` and ``checks.accept_low_fidelity``
            is not set; the message gives the figure and what to do.
    """
    checks = ctx.cfg.checks
    if not ctx.strategy.fidelity:
        return {"message": f"not measured: strategy {ctx.strategy.name!r} does not search around the generator's "
                           "reconstructions of the search images"}
    if not (callable(getattr(generator, "encode", None)) and callable(getattr(generator, "decode", None))):
        return {"message": "not measured: the generator has no encoder"}
    images, labels = sample_search_images(ctx, checks.fidelity_images)
    accuracy = reconstruction_accuracy(generator, ctx.classifier(), images, labels)
    info = {"accuracy": accuracy, "images": int(len(labels)), "min_fidelity": checks.min_fidelity,
            "accepted": bool(accuracy < checks.min_fidelity and checks.accept_low_fidelity)}
    log.info("generator fidelity: the classifier gets %.1f%% of the generator's reconstructions of %d search images "
             "right (threshold %.0f%%)", 100 * accuracy, len(labels), 100 * checks.min_fidelity)
    if accuracy < checks.min_fidelity and not checks.accept_low_fidelity:
        raise ModelError(
            f"generator fidelity {accuracy:.1%}: the classifier gets only that share of the generator's "
            f"reconstructions of {len(labels)} search images right, below checks.min_fidelity "
            f"{checks.min_fidelity:.0%}. Faults found around such reconstructions would be the generator's blur, not "
            "the classifier's failures. Train the generator longer or with a larger latent (genstress train vae "
            "--epochs N --latent-dim D), or accept it: genstress run ... --accept-low-fidelity "
            "(checks.accept_low_fidelity: true)")
    return info


def fidelity_line(fidelity: dict | None) -> str:
    """The fidelity in one line, for run summaries."""
    if not fidelity:
        return "generator fidelity: not measured"
    if "message" in fidelity:
        return f"generator fidelity: {fidelity['message']}"
    low = " (below the threshold, accepted by checks.accept_low_fidelity)" if fidelity.get("accepted") else ""
    return (f"generator fidelity: {fidelity['accuracy']:.1%} of {fidelity['images']} search images' reconstructions "
            f"classified right (threshold {fidelity['min_fidelity']:.0%}){low}")
