"""Training of the built-in style-based GAN, and its sample validity.

The recipe is StyleGAN2's, cut down for a CPU: the non-saturating logistic loss, lazy R1 on real
images, style-mixing regularization (so that mixed codes stay images, which latent code mixing
relies on), Adam with beta1 = 0, plus an auxiliary classifier loss on both sides (AC-GAN) that makes
samples of class c look like class c to a classifier after a few epochs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genstress_ray.data import ImageSet
from genstress_ray.models.registry import get_model
from genstress_ray.models.stylegan import StyleDiscriminator

log = logging.getLogger(__name__)


def sample_ws(generator: nn.Module, z: torch.Tensor, c: torch.Tensor, mixing_prob: float = 0.0) -> torch.Tensor:
    """Styles for ``z`` / one-hot ``c``; with probability ``mixing_prob`` a sample takes its styles
    from a crossover layer on from a second code of the same class."""
    ws = generator.mapping(z, c)
    if mixing_prob > 0:
        n, num_ws = ws.shape[:2]
        ws2 = generator.mapping(torch.randn(z.shape), c)
        cutoff = torch.randint(1, num_ws, (n, 1))
        mixed = torch.rand(n, 1) < mixing_prob
        take = (torch.arange(num_ws)[None] >= cutoff) & mixed
        ws = torch.where(take[:, :, None], ws2, ws)
    return ws


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels, num_classes).float() if num_classes else torch.zeros(len(labels), 0)


@torch.no_grad()
def generate(generator: nn.Module, labels: torch.Tensor, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """Images in [0, 1] for the class ``labels``, from seeded z draws."""
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(len(labels), generator.z_dim, generator=rng)
    c = one_hot(labels, generator.c_dim)
    out = [generator.synthesis(generator.mapping(z[i:i + batch_size], c[i:i + batch_size]))
           for i in range(0, len(labels), batch_size)]
    return (torch.cat(out) * 0.5 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample_validity(generator: nn.Module, reference: nn.Module, per_class: int = 100, seed: int = 0) -> float:
    """The reference classifier's accuracy on generated images against their conditioning class."""
    labels = torch.arange(generator.c_dim).repeat_interleave(per_class)
    images = generate(generator.eval(), labels, seed)
    return float((reference.eval()(images).argmax(1) == labels).float().mean())


def _generator_optimizer(gen: nn.Module, lr: float, mapping_lr: float) -> torch.optim.Optimizer:
    """Modulated weights are scaled at run time (equalized learning rate), so they take StyleGAN's
    large rate; plain Linear layers (mapping, style affines) a smaller one."""
    linear = [p for m in gen.modules() if isinstance(m, nn.Linear) for p in m.parameters()]
    linear_ids = {id(p) for p in linear}
    scaled = [p for p in gen.parameters() if id(p) not in linear_ids]
    return torch.optim.Adam([{"params": scaled, "lr": lr}, {"params": linear, "lr": mapping_lr}], betas=(0.0, 0.99))


def _discriminator_step(gen, disc, opt, real, labels, c_real, c_fake, mixing_prob: float, ac_weight: float,
                        r1_gamma: float, r1_every: int) -> float:
    """Non-saturating loss on real and fake images, the auxiliary class loss on real ones, and (when
    ``r1_gamma`` > 0: every ``r1_every`` steps, lazily scaled) the R1 penalty."""
    with torch.no_grad():
        fake = gen.synthesis(sample_ws(gen, torch.randn(len(real), gen.z_dim), c_fake, mixing_prob))
    r1 = r1_gamma > 0
    real.requires_grad_(r1)
    s_real, cls_real = disc(real, c_real)
    s_fake, _ = disc(fake, c_fake)
    loss = F.softplus(s_fake).mean() + F.softplus(-s_real).mean()
    if cls_real is not None:
        loss = loss + ac_weight * F.cross_entropy(cls_real, labels)
    if r1:
        grad, = torch.autograd.grad(s_real.sum(), real, create_graph=True)
        loss = loss + r1_gamma / 2 * grad.square().sum(dim=(1, 2, 3)).mean() * r1_every
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    real.requires_grad_(False)
    return loss.item()


def _generator_step(gen, disc, opt, c_fake, mixing_prob: float, ac_weight: float) -> tuple[float, float]:
    """Non-saturating generator loss plus the auxiliary class loss on its images."""
    fake = gen.synthesis(sample_ws(gen, torch.randn(len(c_fake), gen.z_dim), c_fake, mixing_prob))
    s_fake, cls_fake = disc(fake, c_fake)
    loss = F.softplus(-s_fake).mean()
    ac = F.cross_entropy(cls_fake, c_fake.argmax(1)) if cls_fake is not None else torch.zeros(())
    opt.zero_grad(set_to_none=True)
    (loss + ac_weight * ac).backward()
    opt.step()
    return loss.item(), ac.item()


def train_stylegan(train: ImageSet, validation: ImageSet | None = None, architecture: str = "small_stylegan",
                   params: dict | None = None, epochs: int = 4, batch_size: int = 64, lr: float = 2e-3,
                   mapping_lr: float = 2e-4, d_lr: float = 2e-4, r1_gamma: float = 1.0, r1_every: int = 4,
                   mixing_prob: float = 0.5, ac_weight: float = 1.0, seed: int = 0,
                   reference: nn.Module | None = None,
                   max_seconds: float | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train the conditional style-based GAN; returns (generator, metrics).

    ``reference``, a classifier trained on real data, measures sample validity after each epoch;
    ``max_seconds`` stops training after the epoch that passes it.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    k = len(train.class_names)
    params = {"in_shape": list(train.image_shape), "num_classes": k, **(params or {})}
    gen = get_model(architecture, **params)
    disc = StyleDiscriminator(params["in_shape"], params["num_classes"])
    g_opt = _generator_optimizer(gen, lr, mapping_lr)
    d_opt = torch.optim.Adam(disc.parameters(), lr=d_lr, betas=(0.0, 0.99))
    x_all, y_all = train.tensors()
    x_all = x_all * 2 - 1
    start, step, history = time.perf_counter(), 0, []
    for epoch in range(epochs):
        gen.train()
        sums = np.zeros(3)
        order = torch.from_numpy(rng.permutation(len(x_all)))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            real, labels = x_all[idx], y_all[idx]
            c_real = one_hot(labels, k)
            c_fake = one_hot(torch.randint(0, max(k, 1), (batch_size,)), k)
            r1 = r1_gamma if step % r1_every == 0 else 0.0
            d_loss = _discriminator_step(gen, disc, d_opt, real, labels, c_real, c_fake, mixing_prob, ac_weight,
                                         r1, r1_every)
            g_loss, ac = _generator_step(gen, disc, g_opt, c_fake, mixing_prob, ac_weight)
            sums += (d_loss, g_loss, ac)
            step += 1
        steps = max(1, len(order) // batch_size)
        validity = sample_validity(gen, reference) if reference is not None and k else None
        history.append(validity)
        log.info("train stylegan: epoch %d/%d d_loss %.3f g_loss %.3f g_class %.3f validity %s (%.0fs)",
                 epoch + 1, epochs, *(sums / steps), "-" if validity is None else f"{validity:.3f}",
                 time.perf_counter() - start)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            log.info("train stylegan: stopping after epoch %d, past max_seconds=%s", epoch + 1, max_seconds)
            break
    metrics: dict[str, Any] = {"train_seconds": time.perf_counter() - start, "steps": step,
                               "epochs_run": len(history)}
    if history and history[-1] is not None:
        metrics["validity"] = history[-1]
    return gen.eval(), {"params": params, **metrics}
