"""Segmentation models under test (the counterfactual method's second half, after the SHIFT
experiments): images -> per-pixel logits over named classes, scored against the source image's mask.

A regenerated image is a fault when the model's mIoU against the source's mask drops by more than a
threshold from its mIoU on the source image itself (``miou_drop``): the scene and its mask are the
same, only appearance changed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genstress_ray.data import IGNORE, DataError, ImageSet
from genstress_ray.models.architectures import _check_shape
from genstress_ray.models.protocols import ModelError
from genstress_ray.models.registry import get_model, register_model

log = logging.getLogger(__name__)


class Segmenter(nn.Module):
    """Batch of images (N, C, H, W) in [0, 1] -> per-pixel logits (N, len(class_names), H, W).

    The network's output is resized to the images' size when it predicts at another resolution.
    Built only for a network whose class count matches ``class_names`` (checked on a blank image).

    Example:
        >>> seg = Segmenter(nn.Conv2d(3, 4, 1), ["road", "car", "sky", "person"], (3, 16, 16))
        >>> seg(torch.zeros(2, 3, 16, 16)).shape
        torch.Size([2, 4, 16, 16])
    """

    def __init__(self, net: nn.Module, class_names: list[str], input_shape: tuple[int, int, int]):
        super().__init__()
        self.net, self.class_names, self.input_shape = net, list(class_names), tuple(int(s) for s in input_shape)
        with torch.no_grad():
            try:
                out = self.net(torch.zeros(1, *self.input_shape))
            except Exception as exc:
                raise ModelError(f"segmentation model does not accept images of shape {self.input_shape}: "
                                 f"{exc}") from exc
        if out.ndim != 4 or out.shape[1] != len(self.class_names):
            raise ModelError(f"segmentation model gives outputs of shape {tuple(out.shape[1:])}; the masks have "
                             f"{len(self.class_names)} classes ({', '.join(self.class_names[:5])}...): expected "
                             f"({len(self.class_names)}, H, W)")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.net(images)
        if logits.shape[-2:] != images.shape[-2:]:
            logits = nn.functional.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits


class SmallSegNet(nn.Module):
    """The built-in segmentation network: a two-level conv encoder-decoder with a skip connection
    (a small U-Net), per-pixel logits at the input's size. ``embed`` pools the bottleneck, the
    features the assessment's diversity and Frechet distance use."""

    def __init__(self, in_shape=(3, 32, 32), num_classes: int = 4, width: int = 16):
        super().__init__()
        c, _, _ = _check_shape(in_shape)
        block = (lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()))
        self.down1, self.down2 = block(c, width), block(width, 2 * width)
        self.bottleneck = block(2 * width, 2 * width)
        self.up = block(3 * width, width)
        self.head = nn.Conv2d(width, num_classes, 1)

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.down1(x)
        return skip, self.bottleneck(self.down2(F.max_pool2d(skip, 2, ceil_mode=True)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x)[1].mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip, deep = self._features(x)
        deep = F.interpolate(deep, size=skip.shape[-2:], mode="nearest")
        return self.head(self.up(torch.cat([deep, skip], 1)))


@register_model("small_segnet", kind="segmenter")
def small_segnet(**params) -> SmallSegNet:
    """The built-in segmentation network (``SmallSegNet``)."""
    return SmallSegNet(**params)


def class_iou(pred: torch.Tensor, mask: torch.Tensor, num_classes: int, ignore: int | None = IGNORE) -> torch.Tensor:
    """Per-image, per-class intersection over union (N, K) of label maps (N, H, W); ``nan`` for a class
    in neither map; pixels labelled ``ignore`` in the mask do not count.

    >>> m = torch.tensor([[[0, 0], [1, 1]]])
    >>> class_iou(torch.tensor([[[0, 1], [1, 1]]]), m, 3).tolist()
    [[0.5, 0.6666666865348816, nan]]
    """
    valid = (mask != ignore) if ignore is not None else torch.ones_like(mask, dtype=torch.bool)
    p = nn.functional.one_hot(pred.clamp(0, num_classes - 1), num_classes).bool() & valid[..., None]
    m = nn.functional.one_hot(mask.clamp(0, num_classes - 1), num_classes).bool() & valid[..., None]
    inter, union = (p & m).flatten(1, 2).sum(1).float(), (p | m).flatten(1, 2).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))


def miou(pred: torch.Tensor, mask: torch.Tensor, num_classes: int, ignore: int | None = IGNORE) -> torch.Tensor:
    """Mean IoU per image (N,) over the classes present in its prediction or mask."""
    return class_iou(pred, mask, num_classes, ignore).nanmean(1)


def miou_drop(source_pred: torch.Tensor, generated_pred: torch.Tensor, mask: torch.Tensor, num_classes: int,
              ignore: int | None = IGNORE) -> tuple[torch.Tensor, torch.Tensor]:
    """The fault score of regenerated images: mIoU on the source image minus mIoU on each regenerated
    one, both against the source's mask (N,); and the per-class IoU drop (N, K), ``nan`` where a class
    is absent from both."""
    before, after = class_iou(source_pred, mask, num_classes, ignore), class_iou(generated_pred, mask, num_classes,
                                                                                  ignore)
    return before.nanmean(1) - after.nanmean(1), before - after


def mean_iou(model: nn.Module, data: ImageSet, batch_size: int = 256) -> float:
    """The mean over images of a segmentation network's mIoU against ``data``'s masks."""
    model.eval()
    x, masks = data.tensors()[0], torch.from_numpy(data.masks).long()
    with torch.no_grad():
        pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(batch_size)])
    return float(miou(pred, masks, len(data.class_names)).nanmean())


def train_segmenter(train: ImageSet, validation: ImageSet | None = None, architecture: str = "small_segnet",
                    params: dict | None = None, epochs: int = 5, batch_size: int = 32, lr: float = 2e-3,
                    seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """Train a segmentation network on ``train``'s masks with Adam and per-pixel cross-entropy
    (unlabelled pixels ignored); returns (model, metrics) with the validation mIoU."""
    for name, data in (("train", train), ("validation", validation)):
        if data is not None and data.masks is None:
            raise DataError(f"data.{name}: a segmentation model trains on masks, and this split has none "
                            "(a segmentation data set such as the 'scenes' source has them)")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = {"in_shape": list(train.image_shape), "num_classes": len(train.class_names), **(params or {})}
    model = get_model(architecture, **params)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, masks = train.tensors()[0], torch.from_numpy(train.masks).long()
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for idx in torch.from_numpy(rng.permutation(len(x))).split(batch_size):
            loss = F.cross_entropy(model(x[idx]), masks[idx], ignore_index=IGNORE)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        log.info("train segmenter: epoch %d/%d loss %.4f", epoch + 1, epochs, total / len(x))
    metrics = {"val_miou": mean_iou(model, validation) if validation is not None else None,
               "train_seconds": time.perf_counter() - start}
    return model.eval(), {"params": params, **metrics}
