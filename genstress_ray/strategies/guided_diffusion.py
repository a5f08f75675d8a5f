"""A class-conditional diffusion sampler with classifier-free guidance and KLDB guidance, in one loop.

The loop follows diffusers' pipelines: set the scheduler's timesteps, scale the initial noise, then
per step: (every ``guidance_every``-th step) move the latent toward the decision boundary with
``kldb_guidance_step``; predict the noise with classifier-free guidance of scale ``beta``; let the
scheduler step. Only deterministic schedulers are allowed (k-LMS, DDIM with eta = 0): with a
stochastic one, the guidance's effect could not be told from the sampler's noise.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDIMScheduler, LMSDiscreteScheduler

from genstress_ray.strategies.kldb import kldb_guidance_step

# Deterministic schedulers by name; a stochastic one is refused (see the module docstring).
SCHEDULERS = {"lms": LMSDiscreteScheduler, "ddim": DDIMScheduler}


def make_scheduler(name: str, num_train_timesteps: int = 1000, **config):
    """A deterministic scheduler by name (``lms`` or ``ddim``)."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is not deterministic or not known; guidance needs one of "
                         f"{', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](num_train_timesteps=num_train_timesteps, **config)


def predicted_x0(scheduler, latents: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """The clean sample the current latent and predicted noise imply (differentiable in both)."""
    if isinstance(scheduler, LMSDiscreteScheduler):  # latents live in sigma space: x = x0 + sigma eps
        sigma = scheduler.sigmas[scheduler.index_for_timestep(t)].to(latents)
        return latents - sigma * eps
    alpha_bar = scheduler.alphas_cumprod[int(t)].to(latents)
    return (latents - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def guided_sample(unet: torch.nn.Module, scheduler, noise: torch.Tensor, class_schedule: Callable[[int], torch.Tensor],
                  null_class: int, classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  subset: torch.Tensor | None = None, steps: int = 40, guidance_every: int = 5, alpha: float = 0.0,
                  beta: float = 3.0, decode: Callable[[torch.Tensor], torch.Tensor] = lambda x: x):
    """Sample a batch from a class-conditional ``unet`` (diffusers ``UNet2DModel`` with class embeddings).

    Args:
        noise: the initial latents (N, C, H, W), one seeded draw per sample.
        class_schedule: step index -> class labels (N,) to condition on at that step (e.g. alternating
            over the classes of the boundary).
        null_class: the label the model was trained with for "no condition" (classifier-free guidance).
        classifier, subset: the classifier under test and the boundary's classes, for KLDB guidance.
        alpha: KLDB guidance step (0: prompt-only sampling); applied every ``guidance_every`` steps.
        beta: classifier-free guidance scale.
        decode: latents -> images the classifier takes ([0, 1]).

    Returns:
        (images, moved): the decoded samples, and per sample how many guidance steps moved it (rows
        with a zero or non-finite gradient are skipped, not fatal).
    """
    if guidance_every < 1:
        raise ValueError(f"guidance_every (k) must be >= 1, got {guidance_every}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    moved = torch.zeros(len(noise), dtype=torch.long)
    null = torch.full((len(noise),), null_class, dtype=torch.long, device=noise.device)

    def guided_eps(x: torch.Tensor, t, labels: torch.Tensor) -> torch.Tensor:
        model_input = scheduler.scale_model_input(x, t)
        both = unet(torch.cat([model_input, model_input]), t, class_labels=torch.cat([labels, null])).sample
        conditional, unconditional = both.chunk(2)
        return unconditional + beta * (conditional - unconditional)

    for i, t in enumerate(scheduler.timesteps):
        labels = class_schedule(i).to(noise.device)
        if alpha > 0 and i % guidance_every == 0:
            latents, ok = kldb_guidance_step(
                latents, lambda x: decode(predicted_x0(scheduler, x, guided_eps(x, t, labels), t)),
                classifier, subset, alpha)
            moved += ok.long().cpu()
        with torch.no_grad():
            latents = scheduler.step(guided_eps(latents, t, labels), t, latents).prev_sample
    with torch.no_grad():
        return decode(latents), moved
