"""KLDB guidance (Gomes et al., "Stress testing classifiers around the decision boundary with latent
diffusion"): push a diffusion sampler's latent toward the decision boundary of a class subset C.

Every k-th denoising step, the predicted clean image x0(latent) is classified and the latent moves
against the gradient of KLDB(B || softmax f(x0)), B uniform over C. The step is normalised per sample
and scaled to the latent's own norm, so ``alpha`` is a relative step size whatever the latent's scale.
"""

from __future__ import annotations

from typing import Callable

import torch

from genstress_ray.metrics import kldb


def kldb_guidance_step(latents: torch.Tensor, predict_x0: Callable[[torch.Tensor], torch.Tensor],
                       classifier: Callable[[torch.Tensor], torch.Tensor], subset: torch.Tensor,
                       alpha: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One guidance step on a batch of latents; returns (new latents, which rows were moved).

    ``alpha`` is one step size for the batch or one per row.

    ``predict_x0`` maps latents to the images the classifier takes (differentiably: the gradient
    flows through it). Rows whose gradient is zero or not finite are left as they are and reported
    as not moved, so one bad sample never stops a batch.

    >>> clf = torch.nn.Linear(2, 2)
    >>> x = torch.tensor([[3.0, -1.0]])
    >>> moved, ok = kldb_guidance_step(x, lambda z: z, clf, torch.tensor([True, True]), 0.1)
    >>> bool(ok[0]), round(float((moved - x).norm() / x.norm()), 6)
    (True, 0.1)
    """
    # Norms and the step in float32: an fp16 latent's squared norm overflows, its gradient underflows.
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=latents.device).expand(len(latents))
    if (alpha < 0).any():
        raise ValueError(f"alpha must be >= 0, got {alpha.min().item()}")
    with torch.enable_grad():
        z = latents.detach().requires_grad_(True)
        loss = kldb(classifier(predict_x0(z)).float(), subset.to(z.device)).sum()
        grad, = torch.autograd.grad(loss, z)
    grad, x = grad.float(), latents.float()
    shape = (-1,) + (1,) * (latents.ndim - 1)
    grad_norm = grad.flatten(1).norm(dim=1)
    ok = torch.isfinite(grad_norm) & (grad_norm > 0) & torch.isfinite(grad.flatten(1)).all(1) & (alpha > 0)
    scale = alpha * x.flatten(1).norm(dim=1) / grad_norm.clamp_min(torch.finfo(grad.dtype).tiny)
    step = torch.where(ok.view(shape), grad * scale.view(shape), torch.zeros_like(grad))
    return (x - step).to(latents.dtype).detach(), ok
