"""Fine-tuning that fixes failure regions, in pure torch: the loop each Ray Train worker runs.

Defuse's objective is L(D) + lambda * L(Df): D is the classifier's training data, Df the labelled
samples of the failure regions (or, for the paper's baseline, the individually labelled faults).
Every step takes one batch of D and one of Df and runs them through the model in a single forward
pass, so DistributedDataParallel sees exactly one forward per backward.

D arrives as batches (a Ray Train worker's shard of a Ray Data dataset, streamed from storage); Df is
small and held whole. Evaluation counts correct predictions per set and per region, so scores over
any stream of batches add up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genstress_ray.data import to_float

# What the trials score (metric -> evaluation set): D's validation and test splits, the regions'
# generated validation and test samples, and the real images inside the failure regions
# (``correction.real``) of the validation and test splits, each against its own label.
EVAL_SETS = {"val_acc": "val", "region_val_acc": "region_val", "test_acc": "test", "region_test_acc": "region_test",
             "real_members_val_acc": "real_members_val", "real_members_test_acc": "real_members_test"}

# A batch: uint8 images (N, C, H, W), int64 labels and, where known, each image's failure region
# (-1: none) and that region's label (-1: none).
Batch = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


@dataclass
class FinetuneSettings:
    lam: float | None  # None: the before trial, which trains nothing
    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 128
    seed: int = 0
    augment: bool = False  # augment Df's batches (``augment``)
    shuffle_rows: int = 4096  # rows D is shuffled within as it streams (Ray Data's local shuffle buffer)


def _tally(into: dict, key: str, right: np.ndarray) -> None:
    tally = into.setdefault(key, [0, 0])
    tally[0] += int(right.sum())
    tally[1] += len(right)


def score(model: nn.Module, batches: Iterable[Batch], device: torch.device | str = "cpu") -> dict:
    """Correct predictions of ``model`` over ``batches``, overall and per region:
    ``{"n", "correct", "regions": {id: [correct, n]}, "subgroup": {id: [correct, n]}, "collateral": ...}``.

    Where a batch gives each image's region label (``target``), a region's images split into its
    subgroup (own label = the region's label) and its collateral (any other label).

    >>> score(model, [(images, labels, None, None)])  # doctest: +SKIP
    {'n': 360, 'correct': 341, 'regions': {}, 'subgroup': {}, 'collateral': {}}
    """
    model.eval()
    n, correct, out = 0, 0, {"regions": {}, "subgroup": {}, "collateral": {}}
    with torch.no_grad():
        for x, y, region, target in batches:
            if not len(y):
                continue
            right = (model(to_float(x).to(device)).argmax(1).cpu().numpy() == y)
            n, correct = n + len(y), correct + int(right.sum())
            for rid in np.unique(region) if region is not None else ():
                if rid < 0:
                    continue
                mine = region == rid
                _tally(out["regions"], str(int(rid)), right[mine])
                if target is not None:
                    own = y[mine] == target[mine]
                    for group, keep in (("subgroup", own), ("collateral", ~own)):
                        if keep.any():
                            _tally(out[group], str(int(rid)), right[mine][keep])
    return {"n": n, "correct": correct, **out}


def rate(tally: dict | list) -> float:
    """Accuracy of a ``score`` (or of one region's ``[correct, n]``); ``nan`` for an empty set."""
    correct, n = (tally["correct"], tally["n"]) if isinstance(tally, dict) else tally
    return correct / n if n else float("nan")


def selection_score(metrics: dict[str, float], select_by: str) -> float:
    """What chooses lambda: ``combined`` = mean of D's and the regions' (generated) validation accuracy;
    ``real_region`` = mean of D's and of the real validation images inside the failure regions, each
    against its own label (``combined`` where there are none); ``validation`` = D's alone."""
    regions = metrics.get("real_members_val_acc", float("nan")) if select_by == "real_region" else float("nan")
    if np.isnan(regions) and select_by != "validation":
        regions = metrics.get("region_val_acc", float("nan"))
    return metrics["val_acc"] if np.isnan(regions) else (metrics["val_acc"] + regions) / 2


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts (up to 2 pixels), contrast and sharpening of a batch in [0, 1].

    Generated region samples are smoother and more uniform than real images; a classifier fine-tuned
    on them alone can learn to tell the two apart instead of the region's class.
    """
    n = len(x)
    r = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    shift = (r(n, 2) * 5).long() - 2
    padded = F.pad(x, (2, 2, 2, 2))
    h, w = x.shape[-2:]
    x = torch.stack([padded[i, :, 2 + dy: 2 + dy + h, 2 + dx: 2 + dx + w] for i, (dy, dx) in enumerate(shift.tolist())])
    blur = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = x + r(n, 1, 1, 1) * 1.5 * (x - blur)  # unsharp mask
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * (0.8 + 0.6 * r(n, 1, 1, 1)) + mean).clamp(0, 1)


def array_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> Callable[[int], Iterator[Batch]]:
    """Epoch -> shuffled full batches of in-memory arrays: D for ``finetune`` without Ray Data (tests,
    notebooks)."""
    def epoch(e: int) -> Iterator[Batch]:
        order = np.random.default_rng([seed, e]).permutation(len(y))
        for start in range(0, len(y) - batch_size + 1, batch_size):
            i = order[start: start + batch_size]
            yield x[i], y[i], None, None
    return epoch


def finetune(model: nn.Module, d_epoch: Callable[[int], Iterable[Batch]], fine_x: np.ndarray, fine_y: np.ndarray,
             settings: FinetuneSettings, rank: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    """Minimise L(D) + lam * L(Df) with Adam: ``d_epoch(e)`` yields epoch ``e``'s batches of D (this
    rank's share; every rank must get as many), ``fine_x``/``fine_y`` is Df, cycled in shuffled
    batches of the same size.

    Example:
        >>> finetune(model, array_batches(train_x, train_y, 128, 0), df_x, df_y, FinetuneSettings(lam=1.0))  # doctest: +SKIP
    """
    if len(fine_y) == 0:
        raise ValueError("the fine-tune set is empty: nothing to fine-tune on")
    rng = np.random.default_rng([settings.seed, rank])
    torch.manual_seed(settings.seed + rank)
    augment_rng = torch.Generator().manual_seed(settings.seed + rank)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    f_order, f_at = rng.permutation(len(fine_y)), 0
    model.train()
    for epoch in range(settings.epochs):
        for dx, dy, _, _ in d_epoch(epoch):
            n = len(dy)
            fi = f_order[np.arange(f_at, f_at + settings.batch_size) % len(f_order)]
            f_at += settings.batch_size
            x = to_float(np.concatenate([dx, fine_x[fi]]))
            if settings.augment:
                x[n:] = augment(x[n:], augment_rng)
            logits = model(x.to(device))
            loss = F.cross_entropy(logits[:n], torch.tensor(dy, dtype=torch.long, device=device)) \
                + settings.lam * F.cross_entropy(logits[n:], torch.from_numpy(fine_y[fi]).to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
