"""Defuse's identification step (Slack, Rauschmayr, Kenthapadi): Beta noise on latent means.

Each image's latent mean gets ``draws`` noise vectors with i.i.d. Beta(a, b) components; decodes the
classifier gets wrong are candidate unrestricted adversarial examples. The defaults are what this
project's benchmarks found to work: small noise (a = b = 40, std about 0.06) centred on the latent
mean (the Beta mean a / (a + b) subtracted), and no search around an image whose own reconstruction
the classifier already gets wrong. ``preset: reference`` gives the reference code's settings instead:
Beta(0.75, 0.75) uncentred (the noise lies in [0, 1], so it shifts the latent), every image searched;
on our benchmarks most of its faults were decodes that became another class.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from genstress_ray.strategies.base import Strategy, StrategyParams
from genstress_ray.strategies.seeds import row_rng


# The reference code's settings (``preset: reference``); fields the config sets itself win.
REFERENCE_SETTINGS = {"a": 0.75, "b": 0.75, "centred": False, "only_correct_reconstructions": False}


class DefuseParams(StrategyParams):
    """Defuse identification: ``draws`` Beta(a, b) noise vectors per image added to its latent mean.

    ``preset: reference`` fills the fields the config leaves out with the reference code's settings
    (``REFERENCE_SETTINGS``); without it they take this project's defaults (module docstring).
    """

    name: Literal["defuse"] = "defuse"
    preset: Literal["reference"] | None = None
    a: Annotated[float, Field(gt=0)] = 40.0
    b: Annotated[float, Field(gt=0)] = 40.0
    # Per search image; past a million the noise for one batch no longer fits in memory.
    draws: Annotated[int, Field(gt=0, le=1_000_000)] = 50
    centred: bool = True
    keep: Literal["faults", "all"] = "faults"
    max_faults_per_image: Annotated[int, Field(gt=0)] = 5
    # Count no faults around an image whose own reconstruction the classifier already gets wrong:
    # those are the generator's failures, not the classifier's.
    only_correct_reconstructions: bool = True

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") == "reference":
            return {**REFERENCE_SETTINGS, **data}
        return data


def beta_noise(source_ids: list[str], latent_dim: int, draws: int, a: float, b: float, seed: int,
               centred: bool = False) -> torch.Tensor:
    """Noise (N, draws, latent_dim), float32, one deterministic stream per source id.

    >>> beta_noise(["x"], 3, 2, 2.0, 2.0, seed=0).shape
    torch.Size([1, 2, 3])
    """
    noise = np.stack([row_rng(seed, sid).beta(a, b, size=(draws, latent_dim)) for sid in source_ids]) \
        if source_ids else np.zeros((0, draws, latent_dim))
    if centred:
        noise = noise - a / (a + b)
    return torch.from_numpy(noise.astype(np.float32))


def perturb_latents(mean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Latents (N, draws, d): each latent mean (N, d) plus each of its noise draws (N, draws, d)."""
    return mean[:, None, :] + noise


def select_candidates(fault: torch.Tensor, noise_norm: torch.Tensor, max_per_image: int | None) -> torch.Tensor:
    """Mask (N, draws) of the candidates to keep: per image, up to ``max_per_image`` faults with the
    smallest noise norm (the least perturbed failures). ``None`` keeps every candidate.

    >>> select_candidates(torch.tensor([[True, True, False]]), torch.tensor([[3., 1., 0.]]), 1).tolist()
    [[False, True, False]]
    """
    if max_per_image is None:
        return torch.ones_like(fault)
    ranked = torch.where(fault, noise_norm, torch.full_like(noise_norm, float("inf")))
    order = ranked.argsort(dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    return fault & (rank < max_per_image)


# No source rows of its own: the search starts from the data.search images, shard by shard.
DEFUSE = Strategy("defuse", DefuseParams, "latent_generator", None, stage="genstress_ray.stages.defuse:DefuseSearch",
                  assess="genstress_ray.assessment:assess_search", report="genstress_ray.report.html:search_table",
                  fidelity=True)
