"""Scores of classifier outputs: KLDB, entropy, margin. Plain differentiable torch functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kldb(logits: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """KL(B || softmax(logits)) with B uniform over the classes in ``subset`` and 0 elsewhere.

    ``subset`` is a boolean mask (N, K) or (K,). KLDB is 0 exactly on the boundary between the
    subset's classes (equal probability, none elsewhere) and grows away from it.

    >>> float(kldb(torch.zeros(1, 2), torch.tensor([True, True])))
    0.0
    """
    subset = subset.expand_as(logits)
    size = subset.sum(-1, keepdim=True).clamp_min(1)
    log_p = F.log_softmax(logits, dim=-1)
    log_b = -size.log()
    terms = torch.where(subset, (log_b - log_p) / size, torch.zeros_like(log_p))
    return terms.sum(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits)."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit: how far the prediction is from flipping."""
    top2 = logits.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def top2_subset(logits: torch.Tensor) -> torch.Tensor:
    """Mask of each row's two most likely classes: the boundary a candidate is closest to."""
    mask = torch.zeros_like(logits, dtype=torch.bool)
    return mask.scatter_(-1, logits.topk(2, dim=-1).indices, True)


@torch.no_grad()
def score_logits(logits: torch.Tensor, intended: torch.Tensor) -> dict[str, torch.Tensor]:
    """Everything the ``samples`` table records about a candidate's classification.

    ``fault`` means the prediction differs from the intended (source) class; ``kldb`` is measured
    against the candidate's own top-2 boundary.
    """
    pred = logits.argmax(-1)
    return {
        "pred": pred,
        "probs": logits.softmax(-1),
        "fault": pred != intended,
        "kldb": kldb(logits, top2_subset(logits)),
        "entropy": entropy(logits),
        "margin": margin(logits),
    }
