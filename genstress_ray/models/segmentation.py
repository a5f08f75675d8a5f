"""Segmentation models under test (the counterfactual method's second half, after the SHIFT
experiments): images -> per-pixel logits over named classes, scored against the source image's mask.

A regenerated image is a fault when the model's mIoU against the source's mask drops by more than a
threshold from its mIoU on the source image itself (``miou_drop``): the scene and its mask are the
same, only appearance changed.
"""

from __future__ import annotations

import torch
from torch import nn

from genstress_ray.data import IGNORE
from genstress_ray.models.protocols import ModelError


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
