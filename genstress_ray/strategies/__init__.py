"""Search strategies as plain torch functions over tensors (no Ray here)."""

from genstress_ray.strategies.defuse import beta_noise, perturb_latents, row_rng, select_candidates

__all__ = ["beta_noise", "perturb_latents", "row_rng", "select_candidates"]
