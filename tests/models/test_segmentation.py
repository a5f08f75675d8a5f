"""Segmentation models under test: the protocol, per-class IoU and the mIoU drop of a regenerated
image, with a tiny network trained here on synthetic scenes and their masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genstress_ray.models import ModelError
from genstress_ray.models.segmentation import Segmenter, class_iou, miou, miou_drop

CLASSES = ["ground", "sign", "sky"]


def scenes(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB 16x16 scenes: sky (blue) above ground (grey), a red sign somewhere; and their masks."""
    g = torch.Generator().manual_seed(seed)
    images, masks = torch.zeros(n, 3, 16, 16), torch.zeros(n, 16, 16, dtype=torch.long)
    for i in range(n):
        horizon = int(torch.randint(5, 10, (1,), generator=g))
        masks[i, :horizon] = 2
        images[i, 2, :horizon], images[i, :, horizon:] = 0.9, 0.5
        top, left = (int(v) for v in torch.randint(2, 11, (2,), generator=g))
        masks[i, top:top + 4, left:left + 4] = 1
        images[i, :, top:top + 4, left:left + 4] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    return images + 0.02 * torch.randn(images.shape, generator=g), masks


def trained_segmenter() -> Segmenter:
    """A tiny network trained on ``scenes`` until it segments them (mIoU > 0.9)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    images, masks = scenes(64)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(images), masks).backward()
        opt.step()
    return Segmenter(net.eval(), CLASSES, (3, 16, 16))


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return trained_segmenter()


def test_class_iou_and_miou_by_hand():
    mask = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1], [0, 0, 1, 2]]])
    iou = class_iou(pred, mask, 3)
    assert iou[0, 0].item() == pytest.approx(3 / 4) and iou[0, 1].item() == pytest.approx(3 / 4)
    assert torch.isnan(iou[0, 2])  # only on an ignored pixel
    assert miou(pred, mask, 3).item() == pytest.approx(0.75)


def test_a_changed_appearance_with_the_same_layout_is_scored_by_miou_drop(segmenter):
    images, masks = scenes(16, seed=1)
    with torch.no_grad():
        source = segmenter(images).argmax(1)
        assert miou(source, masks, 3).mean() > 0.9  # the tiny network segments the scenes
        # Same layout, new appearance: a slightly noisier scene, and the same scene with a green sign.
        noisy = segmenter(images + 0.02 * torch.randn_like(images)).argmax(1)
        green = images.clone()
        green[:, 0][masks == 1], green[:, 1][masks == 1] = 0.1, 0.9
        recoloured = segmenter(green).argmax(1)
    drop_noise, _ = miou_drop(source, noisy, masks, 3)
    drop_green, per_class = miou_drop(source, recoloured, masks, 3)
    assert drop_noise.abs().max() < 0.05 and drop_green.mean() > 0.2
    assert per_class[:, 1].mean() > per_class[:, 0].mean()  # the sign class lost most


def test_a_segmentation_model_whose_classes_differ_is_refused():
    with pytest.raises(ModelError, match=r"gives outputs of shape \(4, 16, 16\); the masks have 3 classes"):
        Segmenter(nn.Conv2d(3, 4, 1), CLASSES, (3, 16, 16))
    with pytest.raises(ModelError, match="does not accept images of shape"):
        Segmenter(nn.Conv2d(1, 3, 1), CLASSES, (3, 16, 16))
    # Logits at a lower resolution are resized to the image.
    down = Segmenter(nn.Conv2d(3, 3, 2, stride=2), CLASSES, (3, 16, 16))
    assert down(torch.zeros(1, 3, 16, 16)).shape == (1, 3, 16, 16)


def test_the_built_in_segmenter_trains_on_scene_masks_and_loads_behind_the_protocol(tmp_path):
    from genstress_ray.data import DataError, get_source
    from genstress_ray.models import ModelRef, load_classifier, train_and_save
    from genstress_ray.models.segmentation import mean_iou

    train = get_source("scenes", split="train", size=200, side=16).load()
    validation = get_source("scenes", split="validation", size=200, side=16).load()
    uri = str(tmp_path / "segnet.safetensors")
    metrics = train_and_save("segmenter", "small_segnet", train, validation, uri, {"width": 8}, {"epochs": 8})
    segmenter = load_classifier(ModelRef(uri, task="segmentation"), train.class_names, train.image_shape)
    assert isinstance(segmenter, Segmenter) and segmenter(torch.zeros(2, 3, 16, 16)).shape == (2, 4, 16, 16)
    assert metrics["val_miou"] > 0.7 and mean_iou(segmenter.net, validation) == pytest.approx(metrics["val_miou"])
    # The checkpoint names its classes: masks with other classes are refused, by name.
    with pytest.raises(ModelError, match=r"classes \['ground', 'sky', 'sign', 'car'\] differ from the masks'"):
        load_classifier(ModelRef(uri, task="segmentation"), ["ground", "sky", "car", "sign"], train.image_shape)
    # Data without masks cannot train one.
    digits = get_source("digits", split="train", limit=20).load()
    with pytest.raises(DataError, match="data.train: a segmentation model trains on masks"):
        train_and_save("segmenter", "small_segnet", digits, None, uri, {"width": 8}, {"epochs": 1})
