"""Deterministic random streams per source row, so results do not depend on batching or actors."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def row_rng(seed: int, source_id: str) -> np.random.Generator:
    """A generator that depends only on (seed, source id): the same draws however rows are batched
    or spread over actors."""
    digest = hashlib.blake2b(source_id.encode(), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


def seed_codes(source_ids: list[str], z_dim: int, count: int, seed: int) -> torch.Tensor:
    """Codes (N, count, z_dim) ~ N(0, I), float32: code 0 of each row is its seed code, the rest
    are further draws of the same stream (truncation samples, mixing targets).

    >>> seed_codes(["seed:0"], 4, 3, seed=0).shape
    torch.Size([1, 3, 4])
    """
    codes = [row_rng(seed, sid).standard_normal((count, z_dim)) for sid in source_ids]
    return torch.from_numpy(np.stack(codes).astype(np.float32) if codes else np.zeros((0, count, z_dim), np.float32))
