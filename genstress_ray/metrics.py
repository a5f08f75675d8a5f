"""Scores of classifier outputs (KLDB, entropy, margin) and set-level metrics of generated inputs
(fault detection, diversity, validity, Frechet distance). Plain torch functions, no Ray."""

from __future__ import annotations

import warnings

import numpy as np
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


def subset_margin(logits: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit among the classes in ``subset`` (0 on the boundary between them).

    >>> subset_margin(torch.tensor([[9.0, 2.0, 1.5]]), torch.tensor([False, True, True])).tolist()
    [0.5]
    """
    inside = torch.where(subset.expand_as(logits), logits, torch.full_like(logits, float("-inf")))
    top2 = inside.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def top_in_subset(logits: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """Whether each row's |C| most likely classes are exactly the classes of ``subset`` C (one subset:
    a (K,) mask, or (N, K) with the same classes in every row).

    >>> top_in_subset(torch.tensor([[3.0, 0.0, 2.0], [3.0, 2.0, 0.0]]), torch.tensor([True, False, True])).tolist()
    [True, False]
    """
    subset = subset.expand_as(logits)
    size = int(subset[0].sum()) if len(subset) else 0
    top = logits.topk(size, dim=-1).indices
    return subset.gather(-1, top).all(-1)


def class_subset(names: list[str], class_names: list[str]) -> torch.Tensor:
    """Boolean mask over ``class_names`` for a boundary's classes, given by name or index.

    Raises:
        ValueError: naming the unknown classes, or when fewer than 2 distinct classes are given.
    """
    index = {n: i for i, n in enumerate(class_names)}
    unknown = [n for n in names if str(n) not in index]
    if unknown:
        raise ValueError(f"class subset: unknown classes {unknown}; the classifier's classes are "
                         f"{', '.join(class_names[:20])}{' ...' if len(class_names) > 20 else ''}")
    mask = torch.zeros(len(class_names), dtype=torch.bool)
    mask[[index[str(n)] for n in names]] = True
    if int(mask.sum()) < 2:
        raise ValueError(f"class subset {list(names)}: a decision boundary needs at least 2 distinct classes")
    return mask


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature T > 0 that minimises the cross-entropy of ``logits / T`` on held-out
    ``labels`` (Guo et al. 2017); calibrated probabilities make KLDB's "equal probability" meaningful."""
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter)
    logits, labels = logits.detach().double(), labels.long()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.double().exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


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


@torch.no_grad()
def score_boundary(logits: torch.Tensor, subset: torch.Tensor, boundary_kldb: float) -> dict[str, torch.Tensor]:
    """``score_logits`` for samples aimed at the boundary of class subset C: ``kldb`` and ``margin``
    are measured against C, and ``fault`` marks a sample on the boundary (KLDB <= ``boundary_kldb``),
    the candidates that regions are fitted on and labelled."""
    distance = kldb(logits, subset)
    return {"pred": logits.argmax(-1), "probs": logits.softmax(-1), "fault": distance <= boundary_kldb,
            "kldb": distance, "entropy": entropy(logits), "margin": subset_margin(logits, subset)}


# Set-level metrics of a search strategy's output (README, "Metrics", gives the exact definitions).

def fault_detection(faults: int, candidates: int, generator_calls: int) -> dict[str, float]:
    """Faults per generated candidate and per generator call (``nan`` when nothing was generated)."""
    return {"faults_per_candidate": faults / candidates if candidates else float("nan"),
            "faults_per_call": faults / generator_calls if generator_calls else float("nan")}


def mean_pairwise_distance(features: torch.Tensor, max_points: int = 2000, seed: int = 0) -> float:
    """Mean Euclidean distance over all pairs of rows (a seeded subsample of ``max_points`` rows when
    there are more); ``nan`` for fewer than 2 rows."""
    n = len(features)
    if n < 2:
        return float("nan")
    if n > max_points:
        features = features[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_points]]
        n = max_points
    d = torch.cdist(features.double(), features.double())
    return float(d.sum() / (n * (n - 1)))


def distinct_class_pairs(intended: torch.Tensor, pred: torch.Tensor) -> int:
    """How many distinct (intended class, predicted class) pairs the faults cover."""
    return len(set(zip(intended.tolist(), pred.tolist())))


def edge_agreement(source: torch.Tensor, generated: torch.Tensor, tolerance: int = 1) -> torch.Tensor:
    """How well a regenerated image keeps its source's layout: the F1 score of their edge maps
    (N, 1 or C, H, W, edges > 0), an edge pixel counting as matched when the other map has an edge within
    ``tolerance`` pixels. 1 for the same edges; 0 when none match. Two empty maps agree (1).

    >>> e = torch.zeros(1, 1, 8, 8); e[0, 0, 4, 2:6] = 1
    >>> [edge_agreement(e, e.roll(shift, 2)).tolist() for shift in (0, 1, 3)]
    [[1.0], [1.0], [0.0]]
    """
    a, b = (source > 0).any(1, keepdim=True).float(), (generated > 0).any(1, keepdim=True).float()
    grow = (lambda t: F.max_pool2d(t, 2 * tolerance + 1, 1, tolerance)) if tolerance else (lambda t: t)
    precision_hits, recall_hits = (b * grow(a)).flatten(1).sum(1), (a * grow(b)).flatten(1).sum(1)
    n_a, n_b = a.flatten(1).sum(1), b.flatten(1).sum(1)
    precision = torch.where(n_b > 0, precision_hits / n_b.clamp_min(1), (n_a == 0).float())
    recall = torch.where(n_a > 0, recall_hits / n_a.clamp_min(1), (n_b == 0).float())
    return torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12),
                       torch.zeros_like(precision))


def text_diversity(texts: list[str]) -> dict[str, float]:
    """Diversity of generated texts (counterfactual captions): ``distinct_2``, the share of word bigrams
    that are unique, and ``jaccard``, the mean pairwise Jaccard distance of their word sets (``nan``
    below 2 texts).

    >>> text_diversity(["a red car", "a blue car", "a red car"])
    {'distinct_2': 0.667, 'jaccard': 0.333}
    """
    words = [t.lower().split() for t in texts]
    bigrams = [tuple(w[i:i + 2]) for w in words for i in range(len(w) - 1)]
    sets = [set(w) for w in words]
    pairs = [(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets))]
    jaccard = [1 - len(sets[i] & sets[j]) / max(1, len(sets[i] | sets[j])) for i, j in pairs]
    return {"distinct_2": round(len(set(bigrams)) / len(bigrams), 3) if bigrams else float("nan"),
            "jaccard": round(float(np.mean(jaccard)), 3) if jaccard else float("nan")}


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image pair, images (N, C, H, W) in [0, 1]: Gaussian
    window (11, sigma 1.5, shrunk to the image side when smaller), K1 = 0.01, K2 = 0.03, averaged
    over the valid window positions and the channels.

    >>> x = torch.rand(2, 1, 16, 16)
    >>> ssim(x, x).tolist()
    [1.0, 1.0]
    """
    size = min(window, x.shape[-1], x.shape[-2])
    c = x.shape[1]
    w = _gaussian_window(size, sigma).to(x.device).expand(c, 1, size, size)
    x, y = x.double(), y.double()

    def blur(t):
        return F.conv2d(t, w, groups=c)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, d), as in FID:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)). ``nan`` when a set has fewer than 2 rows."""
    from scipy import linalg

    if len(a) < 2 or len(b) < 2:
        return float("nan")
    a, b = a.double().cpu().numpy(), b.double().cpu().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        # Fewer rows than features make the product singular; its square root is still defined.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s_a @ s_b)
        if not np.isfinite(covmean).all():  # FID's usual fix: a small ridge
            eps = np.eye(len(s_a)) * 1e-6
            covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean.real))


@torch.no_grad()
def penultimate_features(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The classifier's penultimate features: its ``embed()`` when it has one, else the input of its
    last ``nn.Linear`` (captured with a forward hook); for a fully convolutional network (a
    segmentation model) the input of its last ``nn.Conv2d``, averaged over the image."""
    was_training = net.training
    net.eval()
    if callable(getattr(net, "embed", None)):
        out = [net.embed(x) for x in images.split(batch_size)]
    else:
        heads = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
        pool = not heads
        heads = heads or [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        if not heads:
            raise ValueError(f"{type(net).__name__} has neither embed() nor an nn.Linear or nn.Conv2d head to take "
                             "features from")
        captured: list[torch.Tensor] = []
        hook = heads[-1].register_forward_hook(
            lambda m, inp, out: captured.append(inp[0].mean((2, 3)) if pool else inp[0].flatten(1)))
        try:
            for x in images.split(batch_size):
                net(x)
        finally:
            hook.remove()
        out = captured
    net.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def reconstruction_error(vae: torch.nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Per-image binary cross-entropy (nats) between images in [0, 1] and the VAE's reconstruction of
    their posterior mean: the out-of-distribution score of the validity check."""
    errors = []
    for x in images.split(batch_size):
        mean, _ = vae.encode(x)
        recon = vae.decode(mean).clamp(1e-6, 1 - 1e-6)
        errors.append(F.binary_cross_entropy(recon, x, reduction="none").flatten(1).sum(1))
    return torch.cat(errors) if errors else torch.zeros(0)
