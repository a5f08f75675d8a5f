"""Random truncation of a style-based generator's latents (Merabishvili, Weissl, Stocco 2026).

Two regularizers pull generated inputs toward the typical set: the truncation trick on styles,
w' = w_avg + psi (w - w_avg), over a psi schedule, and clipping every component of z to a random
bound [-r, r]. Each candidate records its psi and r.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from genstress_ray.strategies.base import Strategy
from genstress_ray.strategies.seeds import StyleSearchParams, row_rng, seed_rows


class TruncationParams(StyleSearchParams):
    """Random truncation: ``budget_calls`` samples per seed's class, truncated toward w_avg by the psi
    schedule and, with ``clip_probability``, with z clipped to a bound drawn from ``clip_range``."""

    name: Literal["truncation"] = "truncation"
    psi: Annotated[list[Annotated[float, Field(ge=0, le=1)]], Field(min_length=1)] = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    clip_range: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] | None = (1.0, 3.0)
    clip_probability: Annotated[float, Field(ge=0, le=1)] = 0.5

    @field_validator("clip_range")
    @classmethod
    def _ordered(cls, v):
        if v is not None and v[0] > v[1]:
            raise ValueError(f"clip_range {list(v)}: the low bound must not exceed the high one")
        return v


def truncate(ws: torch.Tensor, w_avg: torch.Tensor, psi) -> torch.Tensor:
    """w_avg + psi (w - w_avg); ``psi`` a number or one value per row of ``ws``.

    psi = 1 leaves w as it is; psi = 0 gives w_avg.

    >>> truncate(torch.tensor([[2.0]]), torch.tensor([1.0]), 0.5)
    tensor([[1.5000]])
    """
    psi = torch.as_tensor(psi, dtype=ws.dtype, device=ws.device)
    if psi.ndim:
        psi = psi.reshape(-1, *([1] * (ws.ndim - 1)))
    # lerp is exact at both ends: psi = 1 returns ws bit for bit, psi = 0 returns w_avg.
    return torch.lerp(w_avg.to(ws).expand_as(ws), ws, psi.expand_as(ws))


def clip_codes(z: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Each row of ``z`` clipped component-wise to [-bound, bound] (``inf``: not clipped)."""
    bound = bound.to(z).reshape(-1, 1)
    return torch.maximum(torch.minimum(z, bound), -bound)


def truncation_plan(source_ids: list[str], draws: int, psi_schedule: list[float],
                    clip_range: tuple[float, float] | None, clip_probability: float,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """psi (N, draws) and clipping bound (N, draws) for each seed's draws.

    Draw j takes ``psi_schedule[j % len]``; with probability ``clip_probability`` it is also clipped,
    to a bound drawn uniformly from ``clip_range`` (``inf`` when not clipped). Deterministic per
    (seed, source id).
    """
    psi = torch.tensor(psi_schedule, dtype=torch.float32)[torch.arange(draws) % len(psi_schedule)]
    bounds = np.full((len(source_ids), draws), np.inf, np.float32)
    if clip_range is not None and clip_probability > 0:
        for i, sid in enumerate(source_ids):
            rng = row_rng(seed, f"{sid}:clip")
            clip = rng.random(draws) < clip_probability
            bounds[i, clip] = rng.uniform(*clip_range, size=draws)[clip]
    return psi.expand(len(source_ids), -1).clone(), torch.from_numpy(bounds)


TRUNCATION = Strategy("truncation", TruncationParams, "style_generator", seed_rows,
                      stage="genstress_ray.stages.style:TruncationSearch",
                      assess="genstress_ray.assessment:assess_search", report="genstress_ray.report.html:search_table")
