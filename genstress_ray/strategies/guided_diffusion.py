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

from typing import Annotated, Callable, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, field_validator

from genstress_ray.metrics import class_subset
from genstress_ray.strategies.base import Strategy, StrategyParams
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


# The paper's grid (Gomes et al.): alpha = 0 is the prompt-only baseline.
PAPER_ALPHAS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.5, 1.0]
PAPER_BETAS = [3.0, 6.0, 9.0]


class KldbParams(StrategyParams):
    """KLDB-guided diffusion toward the decision boundary of the classes named in ``classes``.

    Every (alpha, beta) of the sweep samples the same ``seeds`` initial noises, so grid points differ only
    by the guidance. ``alphas`` scale the KLDB step (0 = prompt only), applied every ``guidance_every``
    (k) of ``steps`` denoising steps of a deterministic ``scheduler``; ``betas`` are classifier-free
    guidance scales. The prompt conditions on the classes of C: the pixel model alternates over their
    class embeddings step by step; Stable Diffusion gets ``prompt`` ("{classes}" is replaced by the
    names joined with "and"). A sample is kept as a boundary candidate (``fault``) when its KLDB, on
    the classifier under test, is at most ``boundary_kldb`` (0.1 is about a 70/30 split of 2 classes).
    """

    name: Literal["kldb"] = "kldb"
    classes: Annotated[list[str], Field(min_length=2)]
    seeds: Annotated[int, Field(gt=0)] = 200
    alphas: Annotated[list[Annotated[float, Field(ge=0)]], Field(min_length=1)] = PAPER_ALPHAS
    betas: Annotated[list[Annotated[float, Field(ge=0)]], Field(min_length=1)] = PAPER_BETAS
    steps: Annotated[int, Field(gt=0)] = 40
    guidance_every: Annotated[int, Field(ge=1)] = 5
    scheduler: str = "lms"
    prompt: str = "a photo of a {classes}"
    negative_prompt: str = ""
    boundary_kldb: Annotated[float, Field(gt=0)] = 0.1
    # Fit a temperature for the classifier on data.validation before guiding (the reference code's advice).
    calibrate: bool = False
    keep: Literal["boundary", "all"] = "all"

    @field_validator("classes")
    @classmethod
    def _distinct(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"classes {v}: a class is named twice")
        return v

    @field_validator("scheduler")
    @classmethod
    def _deterministic(cls, v):
        return check_scheduler(v)


def sweep_rows(params: KldbParams, search, generator) -> pa.Table:
    """Every seed at every (alpha, beta) of the sweep (``draw`` = the grid point)."""
    grid = [(a, b) for b in params.betas for a in params.alphas]
    point, seed = np.divmod(np.arange(len(grid) * params.seeds), params.seeds)
    return pa.table({"source_id": [f"seed:{i}" for i in seed], "source_label": np.full(len(seed), -1),
                     "alpha": np.asarray([grid[g][0] for g in point], np.float64),
                     "beta": np.asarray([grid[g][1] for g in point], np.float64), "draw": point})


def boundary_spec(params: KldbParams, class_names: list[str], temperature: Callable[[], float]) -> dict:
    """What every stage scores a KLDB run's candidates against: the indices of C, the boundary threshold
    and, with ``calibrate``, the classifier's fitted temperature."""
    try:
        subset = class_subset(params.classes, class_names).nonzero().squeeze(1).tolist()
    except ValueError as exc:
        raise ValueError(f"strategy.classes: {exc}") from None
    return {"subset": subset, "threshold": params.boundary_kldb,
            "temperature": temperature() if params.calibrate else 1.0}


KLDB = Strategy("kldb", KldbParams, "diffusion_model", sweep_rows, stage="genstress_ray.stages.kldb:KldbSearch",
                assess="genstress_ray.assessment:assess_sweep", report="genstress_ray.report.html:sweep_table",
                boundary=boundary_spec)
