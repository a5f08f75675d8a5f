"""Real images inside the failure regions: encode a split with the run's generator and place an image in
a failure region only when it is as close to the region as the region's own faults are
(``regions.assign_real``); every other image belongs to no region.

Correction scores the real members of the validation and test splits (whether a fix holds on real
images) and can fine-tune on the training split's members; data repair proposes relabelling the
training members whose dataset label differs from their region's label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from genstress_ray.context import RunContext
from genstress_ray.data import ImageSet, to_float
from genstress_ray.regions import assign_real, membership_criterion


@dataclass
class RegionMembers:
    """One split's images, each with its failure region (-1: none), that region's label (-1: none) and
    its log density under the region's Gaussian (``score``: higher is more typical of the region)."""

    split: ImageSet
    region: np.ndarray
    target: np.ndarray
    score: np.ndarray

    @property
    def inside(self) -> np.ndarray:
        return self.target >= 0


def failure_region_labels(labels: pa.Table, class_names: list[str]) -> tuple[dict[int, int], int]:
    """The label index of every failure region in a ``labels`` table, and how many regions are labelled."""
    labels = labels.filter(pc.invert(pc.is_null(pc.field("region_id"))))
    failures = labels.filter(pc.field("is_failure"))
    return ({r: class_names.index(lab) for r, lab in zip(failures["region_id"].to_pylist(),
                                                          failures["label"].to_pylist())}, labels.num_rows)


class FailureRegions:
    """A run's failure regions, ready to take real images in.

    ``open`` returns a message instead when the run's generator has no encoder (real images cannot be
    placed in its latent space).

    Example:
        >>> regions = FailureRegions.open(ctx, {3: 7}, quantile=0.9)  # doctest: +SKIP
        >>> members = regions.members(load_split(ctx.cfg.data.train_spec()))  # doctest: +SKIP
    """

    def __init__(self, generator, regions: pa.Table, fault_latents: np.ndarray, failure_labels: dict[int, int],
                 quantile: float):
        self.generator, self.regions, self.fault_latents = generator, regions, fault_latents
        self.failure_labels, self.quantile = failure_labels, quantile

    @property
    def criterion(self) -> str:
        return membership_criterion(self.quantile)

    @classmethod
    def open(cls, ctx: RunContext, failure_labels: dict[int, int], quantile: float) -> "FailureRegions | str":
        generator = ctx.generator()
        if not callable(getattr(generator, "encode", None)):
            return (f"not measured: the {ctx.cfg.strategy.generator_kind} has no encoder to place real images "
                    "in the regions")
        faults = ctx.store.read_table("identify", columns=["latent"], filter=pc.field("fault"))
        latents = np.stack(faults["latent"].to_numpy(zero_copy_only=False)) if faults.num_rows else np.zeros((0, 0))
        return cls(generator, ctx.store.read_table("regions"), latents, failure_labels, quantile)

    def latents(self, images: np.ndarray) -> np.ndarray:
        """Latent means of real images under the generator's encoder."""
        x = to_float(images)
        with torch.no_grad():
            return torch.cat([self.generator.encode(chunk)[0] for chunk in x.split(512)]).numpy()

    def place(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each image's failure region (-1: none), that region's label (-1: none) and its log density
        there (-inf outside)."""
        if not len(images):
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        latents = self.latents(images)
        known = self.fault_latents if len(self.fault_latents) else np.zeros((0, latents.shape[1]))
        membership = assign_real(self.regions, known, latents, self.quantile)
        target = np.array([self.failure_labels.get(int(r), -1) for r in membership.region], np.int64)
        inside = target >= 0
        return np.where(inside, membership.region, -1), target, np.where(inside, membership.log_density, -np.inf)

    def members(self, split: ImageSet) -> RegionMembers:
        """Which of ``split``'s images lie inside which failure region."""
        return RegionMembers(split, *self.place(split.images))
