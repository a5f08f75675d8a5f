"""Search strategies: plain torch over tensors (no Ray here), each declared once as a ``Strategy``.

A new strategy is its module here (torch code, parameter model, ``Strategy``), its Ray stage in
``genstress_ray.stages`` and one line in ``BUILT_IN`` below (README, "Architecture").
"""

from genstress_ray.strategies.base import STRATEGIES, Strategy, StrategyParams, register_strategy
from genstress_ray.strategies.counterfactual import COUNTERFACTUAL, CounterfactualParams
from genstress_ray.strategies.defuse import DEFUSE, DefuseParams, beta_noise, perturb_latents, select_candidates
from genstress_ray.strategies.guided_diffusion import KLDB, PAPER_ALPHAS, PAPER_BETAS, KldbParams
from genstress_ray.strategies.mixing import (MIXING, BoundarySearch, MixingParams, boundary_search, default_layer_sets,
                                             layer_masks, mix_styles, runner_up_classes)
from genstress_ray.strategies.seeds import StyleSearchParams, row_rng, seed_codes, seed_noise
from genstress_ray.strategies.truncation import TRUNCATION, TruncationParams, clip_codes, truncate, truncation_plan

BUILT_IN = (DEFUSE, TRUNCATION, MIXING, KLDB, COUNTERFACTUAL)
for _strategy in BUILT_IN:
    register_strategy(_strategy)

__all__ = ["PAPER_ALPHAS", "PAPER_BETAS", "STRATEGIES", "BoundarySearch", "CounterfactualParams", "DefuseParams", "KldbParams", "MixingParams",
           "Strategy", "StrategyParams", "StyleSearchParams", "TruncationParams", "beta_noise", "boundary_search",
           "clip_codes", "default_layer_sets", "layer_masks", "mix_styles", "perturb_latents", "register_strategy",
           "row_rng", "runner_up_classes", "seed_codes", "seed_noise", "select_candidates", "truncate",
           "truncation_plan"]
