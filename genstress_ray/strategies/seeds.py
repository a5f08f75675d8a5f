"""Deterministic random streams per source row, so results do not depend on batching or actors."""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field

from genstress_ray.strategies.base import StrategyParams


def row_rng(seed: int, source_id: str) -> np.random.Generator:
    """A generator that depends only on (seed, source id): the same draws however rows are batched
    or spread over actors."""
    digest = hashlib.blake2b(source_id.encode(), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


def seed_noise(source_ids: list[str], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal draws (N, *shape), float32, row i from source id i's own stream.

    >>> seed_noise(["seed:0", "seed:1"], (1, 2, 2), seed=0).shape
    torch.Size([2, 1, 2, 2])
    """
    draws = [row_rng(seed, sid).standard_normal(shape) for sid in source_ids]
    return torch.from_numpy(np.stack(draws).astype(np.float32) if draws else np.zeros((0, *shape), np.float32))


def seed_codes(source_ids: list[str], z_dim: int, count: int, seed: int) -> torch.Tensor:
    """Codes (N, count, z_dim) ~ N(0, I), float32: code 0 of each row is its seed code, the rest
    are further draws of the same stream (truncation samples, mixing targets).

    >>> seed_codes(["seed:0"], 4, 3, seed=0).shape
    torch.Size([1, 3, 4])
    """
    return seed_noise(source_ids, (count, z_dim), seed)


class StyleSearchParams(StrategyParams):
    """What the style-based strategies share: the seed list and the per-seed generator-call budget.

    Seed i is class ``i % num_classes`` (for a conditional generator) with a code drawn from its own
    stream, so a seed list is the same for every strategy and every way of batching it.
    """

    seeds: Annotated[int, Field(gt=0)] = 1000
    # Generator calls (images synthesised) per seed.
    budget_calls: Annotated[int, Field(gt=0)] = 60
    keep: Literal["faults", "all"] = "faults"


def seed_rows(params: StyleSearchParams, search, generator) -> pa.Table:
    """The seed list: seed i is class i % K for a conditional generator (-1: the generator decides)."""
    n, k = params.seeds, len(search.class_names)
    labels = np.arange(n) % k if getattr(generator, "c_dim", 1) else np.full(n, -1)
    return pa.table({"source_id": [f"seed:{i}" for i in range(n)], "source_label": labels.astype(np.int64)})
