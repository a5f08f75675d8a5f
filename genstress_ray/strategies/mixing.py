"""Latent code mixing toward runner-up classes, with a binary search on the mixing weight.

The method of Merabishvili, Weissl and Stocco (2026), after MIMICRY's style mixing: a seed the
classifier gets right keeps its styles, except on one set of style layers, which move toward the
styles of a code generated for one of the classifier's runner-up classes. If the label flips at full
weight, a binary search on the weight finds the smallest change that still flips it: a test input on
the decision boundary.

Every function here works on a batch of independent searches at once (one row per (seed, target,
layer set)), so a whole batch of seeds costs one generator call per search step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Callable, Literal

import torch
from pydantic import Field

from genstress_ray.strategies.base import Strategy
from genstress_ray.strategies.seeds import StyleSearchParams, seed_rows


class MixingParams(StyleSearchParams):
    """Latent code mixing toward the classifier's ``top_k`` runner-up classes over ``layer_sets``
    (default: every single layer and the coarse/middle/fine thirds), with a binary search on the
    mixing weight of at most ``max_iterations`` steps down to a bracket of ``tolerance``.
    ``budget_seconds`` stops a seed's searches after that long (a safety stop: past it, results
    depend on the machine's speed). ``target_tries`` codes per seed look for runner-up class codes
    when the generator is unconditional."""

    name: Literal["mixing"] = "mixing"
    top_k: Annotated[int, Field(gt=0)] = 2
    layer_sets: list[list[Annotated[int, Field(ge=0)]]] | None = None
    max_iterations: Annotated[int, Field(gt=0, le=64)] = 20
    tolerance: Annotated[float, Field(gt=0, lt=1)] = 1e-3
    budget_seconds: Annotated[float, Field(gt=0)] = 60.0
    target_tries: Annotated[int, Field(gt=0)] = 8


def default_layer_sets(num_ws: int) -> list[list[int]]:
    """Every single style layer, then the coarse, middle and fine thirds.

    >>> default_layer_sets(7)[-3:]
    [[0, 1], [2, 3], [4, 5, 6]]
    """
    singles = [[i] for i in range(num_ws)]
    cuts = [0, num_ws // 3, 2 * num_ws // 3, num_ws]
    groups = [list(range(a, b)) for a, b in zip(cuts, cuts[1:]) if b - a > 1]
    return singles + groups


def layer_masks(layer_sets: list[list[int]], num_ws: int) -> torch.Tensor:
    """Boolean masks (S, num_ws) for the layer sets; an index outside [0, num_ws) is an error."""
    masks = torch.zeros(len(layer_sets), num_ws, dtype=torch.bool)
    for s, layers in enumerate(layer_sets):
        bad = [i for i in layers if not 0 <= int(i) < num_ws]
        if bad or not layers:
            raise ValueError(f"strategy.layer_sets[{s}] = {layers}: style layers must be in 0..{num_ws - 1} "
                             f"(the generator has num_ws = {num_ws}) and a set cannot be empty")
        masks[s, list(layers)] = True
    return masks


def mix_styles(seed_ws: torch.Tensor, target_ws: torch.Tensor, masks: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Styles that take ``weight`` of the way from the seed's to the target's on the masked layers.

    ``seed_ws`` and ``target_ws`` are (N, num_ws, w_dim), ``masks`` (N, num_ws), ``weight`` (N,). Weight
    0, or identical codes, give the seed's styles back unchanged.
    """
    # lerp is exact at both ends, so weight 1 copies the target's styles bit for bit.
    mixed = torch.lerp(seed_ws, target_ws, weight.to(seed_ws)[:, None, None].expand_as(seed_ws))
    return torch.where(masks.to(seed_ws.device)[..., None], mixed, seed_ws)


def runner_up_classes(logits: torch.Tensor, intended: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` most likely classes other than the intended one, most likely first: (N, k)."""
    masked = logits.clone()
    masked.scatter_(1, intended[:, None], float("-inf"))
    return masked.topk(k, dim=1).indices


@dataclass
class BoundarySearch:
    """Outcome of ``boundary_search`` per search: the bracket [lower, weight] (the label flips at
    ``weight`` and not at ``lower``), bisection steps, and why it stopped."""

    lower: torch.Tensor
    weight: torch.Tensor
    flipped: torch.Tensor
    probed: torch.Tensor
    iterations: torch.Tensor
    stop: list[str]  # "no_flip", "tolerance", "max_iterations", "budget", "seconds", "not_probed"
    calls: torch.Tensor  # generator calls spent per group

    def record(self, i: int) -> dict:
        """Search ``i`` as the JSON fields of its row's ``params``."""
        return {"weight": round(float(self.weight[i]), 6), "lower": round(float(self.lower[i]), 6),
                "iterations": int(self.iterations[i]), "stop": self.stop[i]}


def _allowed(active: torch.Tensor, groups: torch.Tensor, remaining: torch.Tensor) -> torch.Tensor:
    """Of the active searches, those each group can still pay for, earliest searches first."""
    idx = active.nonzero().squeeze(1)
    g = groups[idx]
    # Rank of each active search within its group, in search order: a stable sort by group, then the
    # distance from the first search of the same group.
    order = torch.argsort(g, stable=True)
    sorted_g = g[order]
    rank = torch.empty_like(g)
    rank[order] = torch.arange(len(g)) - torch.searchsorted(sorted_g, sorted_g)
    ok = torch.zeros_like(active)
    ok[idx[rank < remaining[g]]] = True
    return ok


def boundary_search(probe: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], groups: torch.Tensor,
                    budget: torch.Tensor, max_iterations: int = 20, tolerance: float = 1e-3,
                    seconds: float | None = None) -> BoundarySearch:
    """Binary-search the mixing weight of many searches at once.

    ``probe(weights, idx)`` evaluates searches ``idx`` at ``weights`` (one generator call each) and
    says which flipped the label. Each search is first probed at weight 1; a search that flips is
    bisected on [0, 1] until the bracket is at most ``tolerance`` wide or after ``max_iterations``
    steps. ``groups`` (M,) names each search's seed and ``budget`` (G,) the generator calls each seed
    may still spend: when a seed runs short its later searches stop first. ``seconds`` stops every
    search once that much time has passed (results then depend on the machine's speed).

    >>> boundary = torch.tensor([0.3])
    >>> out = boundary_search(lambda w, i: w > boundary[i], torch.tensor([0]), torch.tensor([30]), tolerance=1e-3)
    >>> float(out.lower) <= 0.3 < float(out.weight) <= 0.3 + 1e-3, int(out.iterations)
    (True, 10)
    """
    m = len(groups)
    start = time.monotonic()
    remaining = budget.clone().long()
    lower, weight = torch.zeros(m), torch.ones(m)
    iterations = torch.zeros(m, dtype=torch.long)
    stop = ["not_probed"] * m
    probed = _allowed(torch.ones(m, dtype=torch.bool), groups, remaining)
    flipped = torch.zeros(m, dtype=torch.bool)
    if probed.any():
        idx = probed.nonzero().squeeze(1)
        flipped[idx] = probe(weight[idx], idx).cpu()
        remaining -= torch.bincount(groups[idx], minlength=len(remaining))
    for i in probed.nonzero().squeeze(1).tolist():
        stop[i] = "tolerance" if flipped[i] else "no_flip"
    active = flipped.clone()
    while True:
        active &= (weight - lower > tolerance) & (iterations < max_iterations)
        if not active.any():
            break
        if seconds is not None and time.monotonic() - start > seconds:
            for i in active.nonzero().squeeze(1).tolist():
                stop[i] = "seconds"
            break
        ok = _allowed(active, groups, remaining)
        for i in (active & ~ok).nonzero().squeeze(1).tolist():
            stop[i] = "budget"
        active = ok
        if not active.any():
            break
        idx = active.nonzero().squeeze(1)
        mid = (lower[idx] + weight[idx]) / 2
        flips = probe(mid, idx).cpu()
        weight[idx[flips]] = mid[flips]
        lower[idx[~flips]] = mid[~flips]
        iterations[idx] += 1
        remaining -= torch.bincount(groups[idx], minlength=len(remaining))
    for i in (flipped & (iterations >= max_iterations) & (weight - lower > tolerance)).nonzero().squeeze(1).tolist():
        stop[i] = "max_iterations"
    return BoundarySearch(lower, weight, flipped, probed, iterations, stop, budget.long() - remaining)


def check_layer_sets(params: MixingParams, generator) -> None:
    """The configured layer sets must name layers the generator has (a ValueError says which)."""
    if params.layer_sets:
        layer_masks(params.layer_sets, generator.num_ws)


MIXING = Strategy("mixing", MixingParams, "style_generator", seed_rows, stage="genstress_ray.stages.style:MixingSearch",
                  assess="genstress_ray.assessment:assess_mixing", report="genstress_ray.report.html:search_table",
                  check_generator=check_layer_sets)
