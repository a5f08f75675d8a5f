"""A diffusion sampler with classifier-free guidance and KLDB guidance, in one loop.

The loop follows diffusers' pipelines: set the scheduler's timesteps, scale the initial noise, then
per step: (every ``guidance_every``-th step) move the latent toward the decision boundary with
``kldb_guidance_step``; predict the noise with classifier-free guidance; let the scheduler step.
Only deterministic schedulers are allowed (k-LMS, DDIM with eta = 0): with a stochastic one, the
guidance's effect could not be told from the sampler's noise.

The model enters as ``noise_pred(model_input, t, step, beta)``, which returns the guided noise
prediction for a batch; ``models.DiffusionGenerator`` provides it for both the class-conditional
pixel model and Stable Diffusion.
"""

from __future__ import annotations

from typing import Callable

import torch

from genstress_ray.strategies.kldb import kldb_guidance_step

# Deterministic schedulers by config name -> diffusers class name (imported when a sampler is built:
# diffusers takes ~2 s to import, and the config validates names without it).
SCHEDULERS = {"lms": "LMSDiscreteScheduler", "ddim": "DDIMScheduler"}
# Stochastic ones a user may ask for, refused with a reason rather than "unknown".
STOCHASTIC_SCHEDULERS = {"ddpm", "euler_ancestral", "dpm_sde", "dpmsolver_sde", "kdpm2_ancestral", "ancestral"}

NoisePred = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor]


def check_scheduler(name: str) -> str:
    """``name`` if it is a deterministic scheduler KLDB guidance can use; a clear error otherwise."""
    if name in STOCHASTIC_SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is stochastic: guidance needs a deterministic one "
                         f"({', '.join(SCHEDULERS)}), or its effect cannot be told from the sampler's noise")
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULERS)}")
    return name


def make_scheduler(name: str, config: dict | None = None):
    """A deterministic diffusers scheduler by name (``lms`` or ``ddim``) on the model's noise schedule
    ``config`` (a diffusers scheduler config: num_train_timesteps, beta_schedule, ...)."""
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[check_scheduler(name)])
    return cls.from_config(dict(config or {}))


def predicted_x0(scheduler, latents: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """The clean sample the current latent and predicted noise imply (differentiable in both)."""
    if hasattr(scheduler, "sigmas") and hasattr(scheduler, "index_for_timestep"):
        # k-LMS latents live in sigma space: x = x0 + sigma * eps.
        sigma = scheduler.sigmas[scheduler.index_for_timestep(t)].to(latents)
        return latents - sigma * eps
    alpha_bar = scheduler.alphas_cumprod[int(t)].to(latents)
    return (latents - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def guided_sample(noise_pred: NoisePred, scheduler, noise: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor],
                  classifier: Callable[[torch.Tensor], torch.Tensor] | None = None, subset: torch.Tensor | None = None,
                  alpha: torch.Tensor | float = 0.0, beta: torch.Tensor | float = 3.0, steps: int = 40,
                  guidance_every: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample a batch, each row with its own KLDB step ``alpha`` and classifier-free guidance scale ``beta``.

    Args:
        noise_pred: (model input, t, step index, beta per row) -> guided noise prediction.
        noise: the initial latents (N, ...), one seeded draw per sample.
        decode: latents -> images the classifier takes ([0, 1]), differentiably.
        classifier, subset: the classifier under test and the boundary's classes (boolean mask).
        alpha: KLDB step per row (0: prompt only), applied every ``guidance_every`` (k) steps; only rows
            with alpha > 0 pay for the gradient.
        beta: classifier-free guidance scale per row.

    Returns:
        (latents, images, moved): the final latents, their decoded images, and per row how many
        guidance steps moved it (rows with a zero or non-finite gradient are skipped, not fatal).

    >>> x, _, moved = guided_sample(lambda x, t, i, b: torch.zeros_like(x), make_scheduler("ddim"),
    ...                             torch.ones(2, 3), lambda z: z, steps=4)
    >>> tuple(x.shape), moved.tolist()
    ((2, 3), [0, 0])
    """
    if guidance_every < 1:
        raise ValueError(f"guidance_every (k) must be >= 1, got {guidance_every}")
    n = len(noise)
    alpha = torch.as_tensor(alpha, dtype=torch.float32).expand(n).to(noise.device)
    beta = torch.as_tensor(beta, dtype=torch.float32).expand(n).to(noise.device)
    if (alpha < 0).any():
        raise ValueError(f"alpha must be >= 0, got {alpha.min().item()}")
    guided = (alpha > 0).nonzero().flatten()
    if len(guided) and (classifier is None or subset is None):
        raise ValueError("alpha > 0 needs a classifier and a class subset to guide toward")
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    moved = torch.zeros(n, dtype=torch.long)

    def eps(x: torch.Tensor, t, i: int, rows: torch.Tensor) -> torch.Tensor:
        return noise_pred(scheduler.scale_model_input(x, t), t, i, beta[rows])

    everyone = torch.arange(n, device=noise.device)
    for i, t in enumerate(scheduler.timesteps):
        if len(guided) and i % guidance_every == 0:
            step, ok = kldb_guidance_step(
                latents[guided], lambda x: decode(predicted_x0(scheduler, x, eps(x, t, i, guided), t)),
                classifier, subset, alpha[guided])
            latents = latents.index_copy(0, guided, step)
            moved[guided.cpu()] += ok.long().cpu()
        with torch.no_grad():
            latents = scheduler.step(eps(latents, t, i, everyone), t, latents).prev_sample
    with torch.no_grad():
        return latents, decode(latents), moved
