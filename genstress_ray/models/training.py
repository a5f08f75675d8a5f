"""Training of the small built-in models, and a cache keyed by the training config's hash.

A campaign that names no checkpoint trains the model once; every later campaign with the same data,
architecture and training settings finds the cached safetensors file instead of retraining.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genstress_ray.data import ImageSet, to_float
from genstress_ray.models.loading import save_checkpoint
from genstress_ray.models.registry import MODEL_KINDS, get_model
from genstress_ray.storage import filesystem_for

log = logging.getLogger(__name__)
CACHE_FORMAT = 2  # bump when training code changes what a cached model would be


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield torch.from_numpy(order[start: start + batch_size])


@torch.no_grad()
@torch.no_grad()
def images_predictions(model: nn.Module, images: np.ndarray, batch_size: int = 1024,
                       device: torch.device | str = "cpu") -> np.ndarray:
    """The top-1 class of each uint8 image (N, C, H, W), in batches. Leaves the model's train/eval mode
    as it found it."""
    was_training = model.training
    model.eval()
    preds = [model(to_float(images[i: i + batch_size]).to(device)).argmax(1).cpu().numpy()
             for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def images_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 1024,
                    device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy on uint8 images (N, C, H, W); ``nan`` for an empty set."""
    if len(labels) == 0:
        return float("nan")
    return int((images_predictions(model, images, batch_size, device) == labels).sum()) / len(labels)


def accuracy(model: nn.Module, data: ImageSet, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (0 for an empty set)."""
    model.eval()
    return images_accuracy(model, data.images, data.labels.astype(np.int64), batch_size) if len(data) else 0.0


def train_classifier(train: ImageSet, validation: ImageSet | None = None, architecture: str = "small_cnn",
                     params: dict | None = None, epochs: int = 5, batch_size: int = 64, lr: float = 1e-3,
                     seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """Train a classifier with Adam and cross-entropy; returns (model, metrics)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = {"in_shape": list(train.image_shape), "num_classes": len(train.class_names), **(params or {})}
    model = get_model(architecture, **params)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = train.tensors()
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for idx in _batches(len(y), batch_size, rng):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        val_acc = accuracy(model, validation) if validation is not None else float("nan")
        log.info("train classifier: epoch %d/%d loss %.4f val_acc %.4f", epoch + 1, epochs, total / len(y), val_acc)
    metrics = {"val_acc": accuracy(model, validation) if validation is not None else None,
               "train_seconds": time.perf_counter() - start}
    return model.eval(), {"params": params, **metrics}


def vae_loss(model: nn.Module, x: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """beta-VAE loss per image: Bernoulli reconstruction + beta * KL(q(z|x) || N(0, I))."""
    mean, log_var = model.encode(x)
    z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
    recon = F.binary_cross_entropy_with_logits(model.decode_logits(z), x, reduction="sum") / len(x)
    kl = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).sum(1).mean()
    return recon + beta * kl, recon, kl


def train_vae(train: ImageSet, validation: ImageSet | None = None, architecture: str = "beta_vae",
              params: dict | None = None, epochs: int = 20, batch_size: int = 64, lr: float = 1e-3,
              beta: float = 4.0, anneal_fraction: float = 0.3, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """Train a beta-VAE; the KL weight ramps linearly from 0 to ``beta`` over the first
    ``anneal_fraction`` of the steps (KL annealing, as in the Defuse paper)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = {"in_shape": list(train.image_shape), **(params or {})}
    model = get_model(architecture, **params)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, _ = train.tensors()
    steps_per_epoch = -(-len(x) // batch_size)
    anneal_steps = max(1, int(anneal_fraction * epochs * steps_per_epoch))
    step, start = 0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        sums = np.zeros(2)
        for idx in _batches(len(x), batch_size, rng):
            loss, recon, kl = vae_loss(model, x[idx], beta * min(1.0, step / anneal_steps))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sums += (recon.item() * len(idx), kl.item() * len(idx))
            step += 1
        log.info("train vae: epoch %d/%d recon %.2f kl %.2f", epoch + 1, epochs, *(sums / len(x)))
    metrics: dict[str, Any] = {"train_seconds": time.perf_counter() - start}
    if validation is not None:
        with torch.no_grad():
            model.eval()
            x_val = validation.tensors()[0]
            _, recon, kl = vae_loss(model, x_val, beta)
            mean, log_var = model.encode(x_val)
            kl_per_dim = (-0.5 * (1 + log_var - mean.pow(2) - log_var.exp())).mean(0)
        # Dimensions the posterior uses (mean KL above 0.01 nats): a collapsed VAE has few.
        metrics.update(val_recon=float(recon), val_kl=float(kl), active_dims=int((kl_per_dim > 0.01).sum()))
    return model.eval(), {"params": params, **metrics}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` torch threads, restoring the previous count after.

    Float reductions split across threads sum in another order, so a model trained on another thread
    count comes out (slightly) different; and torch's default, one thread per core, oversubscribes a
    machine that is also running Ray workers (a VAE epoch took minutes instead of seconds).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cache_key(role: str, recipe: dict) -> str:
    """Hash of everything that determines a trained model (data, architecture, settings)."""
    blob = json.dumps({"role": role, "recipe": recipe, "format": CACHE_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_and_save(role: str, architecture: str, train: ImageSet, validation: ImageSet | None, uri: str,
                   params: dict | None = None, settings: dict | None = None, threads: int = 1) -> dict[str, Any]:
    """Train a built-in model on ``threads`` torch threads and write it as a self-describing
    safetensors checkpoint at ``uri``."""
    with torch_threads(threads):
        model, metrics = MODEL_KINDS.get(role).train(train, validation, architecture=architecture, params=params,
                                                     **(settings or {}))
    metrics["threads"] = threads
    save_checkpoint(model, uri, architecture, metrics.pop("params"),
                    extra={"role": role, "class_names": train.class_names, "metrics": metrics})
    return metrics


def cached_model_uri(cache: str, role: str, recipe: dict) -> tuple[str, bool]:
    """Where the model for ``recipe`` lives in ``cache``, and whether it is already there."""
    uri = f"{cache.rstrip('/')}/{role}-{cache_key(role, recipe)}.safetensors"
    fs, path = filesystem_for(uri)
    return uri, fs.exists(path)
