"""Search strategies as plain torch functions over tensors (no Ray here)."""

from genstress_ray.strategies.defuse import beta_noise, perturb_latents, select_candidates
from genstress_ray.strategies.mixing import (BoundarySearch, boundary_search, default_layer_sets, layer_masks,
                                             mix_styles, runner_up_classes)
from genstress_ray.strategies.seeds import row_rng, seed_codes, seed_noise
from genstress_ray.strategies.truncation import clip_codes, truncate, truncation_plan

__all__ = ["BoundarySearch", "beta_noise", "boundary_search", "clip_codes", "default_layer_sets", "layer_masks",
           "mix_styles", "perturb_latents", "row_rng", "runner_up_classes", "seed_codes", "seed_noise",
           "select_candidates", "truncate", "truncation_plan"]
