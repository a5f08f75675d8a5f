"""Fine-tuning that fixes failure regions, in pure torch: the loop each Ray Train worker runs.

Defuse's objective is L(D) + lambda * L(Df): D is the classifier's training data, Df the labelled
samples of the failure regions (or, for the paper's baseline, the individually labelled faults).
Every step takes one batch of D and one of Df and runs them through the model in a single forward
pass, so DistributedDataParallel sees exactly one forward per backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genstress_ray.data import to_float
from genstress_ray.models.training import images_accuracy as accuracy

# Arrays the loop reads (uint8 images N x C x H x W, int64 labels): D's train / validation / test
# splits, the fine-tune set ("finetune" for Defuse, "baseline" for the baseline), and the regions'
# validation and test samples.
EVAL_SETS = {"val_acc": "val", "region_val_acc": "region_val", "test_acc": "test", "region_test_acc": "region_test",
             # Real images inside the failure regions (``correction.real``), where they were measured.
             "real_region_val_acc": "real_region_val", "real_region_test_acc": "real_region_test"}


@dataclass
class FinetuneSettings:
    lam: float
    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 128
    seed: int = 0
    augment: bool = False  # augment Df's batches (``augment``)


def evaluate(model: nn.Module, data: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, float]:
    """Accuracy on every evaluation set present in ``data``."""
    return {metric: accuracy(model, data[f"{name}_x"], data[f"{name}_y"], device=device)
            for metric, name in EVAL_SETS.items() if f"{name}_x" in data}


def region_accuracy(models: dict[str, nn.Module], data: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Accuracy of each model on each failure region's own test samples (``region_test_region``
    names the region of each): ``{"3": {"n": 256, "before": 0.1, "defuse": 0.98}, ...}``."""
    regions = data.get("region_test_region")
    if regions is None:
        return {}
    out = {}
    for rid in np.unique(regions):
        mask = regions == rid
        x, y = data["region_test_x"][mask], data["region_test_y"][mask]
        out[str(int(rid))] = {"n": int(mask.sum()), **{name: accuracy(m, x, y) for name, m in models.items()}}
    return out


def selection_score(metrics: dict[str, float], select_by: str) -> float:
    """What chooses lambda: ``combined`` = mean of D's and the regions' (generated) validation accuracy;
    ``real_region`` = mean of D's and of the real validation images inside the failure regions
    (``combined`` where there are none); ``validation`` = D's alone."""
    regions = metrics.get("real_region_val_acc", float("nan")) if select_by == "real_region" else float("nan")
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


def _shard(order: np.ndarray, step: int, rank: int, world: int, batch: int) -> np.ndarray:
    start = (step * world + rank) * batch
    return order[np.arange(start, start + batch) % len(order)]


def finetune(model: nn.Module, data: dict[str, np.ndarray], fine: str, settings: FinetuneSettings,
             rank: int = 0, world: int = 1, device: torch.device | str = "cpu") -> nn.Module:
    """Minimise L(D) + lam * L(Df) with Adam; ``fine`` names the Df arrays (``finetune`` or ``baseline``).

    Every rank draws the same permutations and takes its own slice, so all ranks run the same number
    of steps (DDP needs that) and together see each D image once per epoch. Df is small and cycled.

    Example:
        >>> finetune(model, data, "finetune", FinetuneSettings(lam=1.0))  # doctest: +SKIP
    """
    rng = np.random.default_rng(settings.seed)
    torch.manual_seed(settings.seed + rank)
    augment_rng = torch.Generator().manual_seed(settings.seed + rank)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    dx, dy = data["train_x"], data["train_y"]
    fx, fy = data[f"{fine}_x"], data[f"{fine}_y"]
    if len(fy) == 0:
        raise ValueError(f"the {fine} set is empty: nothing to fine-tune on")
    steps = max(1, len(dy) // (settings.batch_size * world))
    model.train()
    for _ in range(settings.epochs):
        d_order, f_order = rng.permutation(len(dy)), rng.permutation(len(fy))
        for step in range(steps):
            di = _shard(d_order, step, rank, world, settings.batch_size)
            fi = _shard(f_order, step, rank, world, settings.batch_size)
            n = len(di)
            x = to_float(np.concatenate([dx[di], fx[fi]]))
            if settings.augment:
                x[n:] = augment(x[n:], augment_rng)
            logits = model(x.to(device))
            loss = F.cross_entropy(logits[:n], torch.from_numpy(dy[di]).to(device)) \
                + settings.lam * F.cross_entropy(logits[n:], torch.from_numpy(fy[fi]).to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()

