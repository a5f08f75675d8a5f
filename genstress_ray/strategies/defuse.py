"""Defuse's identification step (Slack, Rauschmayr, Kenthapadi): Beta noise on latent means.

Each image's latent mean gets ``draws`` noise vectors with i.i.d. Beta(a, b) components; decodes the
classifier gets wrong are candidate unrestricted adversarial examples. As in the reference code the
noise is uncentred by default (it lies in [0, 1], so it shifts the latent); ``centred=True``
subtracts the Beta mean a / (a + b).
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from genstress_ray.strategies.base import Strategy, StrategyParams
from genstress_ray.strategies.seeds import row_rng


class DefuseParams(StrategyParams):
    """Defuse identification: ``draws`` Beta(a, b) noise vectors per image added to its latent mean."""

    name: Literal["defuse"] = "defuse"
    a: Annotated[float, Field(gt=0)] = 0.75
    b: Annotated[float, Field(gt=0)] = 0.75
    draws: Annotated[int, Field(gt=0)] = 50
    centred: bool = False
    keep: Literal["faults", "all"] = "faults"
    max_faults_per_image: Annotated[int, Field(gt=0)] = 5
    # Count no faults around an image whose own reconstruction the classifier already gets wrong:
    # those are the generator's failures, not the classifier's.
    only_correct_reconstructions: bool = False


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
                  assess="genstress_ray.assessment:assess_search", report="genstress_ray.report.html:search_table")
