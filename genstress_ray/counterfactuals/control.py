"""Control images that keep a source image's layout when it is regenerated (ControlNet conditioning).

A control is ``(images, masks=None) -> control images``: uint8 (N, C, H, W) images, and for a data
set with segmentation masks their uint8 (N, H, W) label maps, to uint8 (N, 3, H, W) control images.

``canny``: OpenCV's Canny edges, white on black, three channels (what SD 1.5 Canny/HED ControlNets
take). ``segmentation``: the source's mask as a colour-coded map (what segmentation ControlNets take),
for data sets with masks (``MASK_CONTROLS``). Registered in ``CONTROLS``.
"""

from __future__ import annotations

import functools

import numpy as np

from genstress_ray.registry import Registry


def canny(images: np.ndarray, masks: np.ndarray | None = None, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edge maps (N, 3, H, W) uint8 of uint8 (N, C, H, W) images (colour images are edged in grey).

    >>> square = np.zeros((1, 1, 16, 16), np.uint8); square[..., 4:12, 4:12] = 255
    >>> edges = canny(square)
    >>> edges.shape, int(edges[0, 0, 8, 3]), int(edges[0, 0, 8, 8])
    ((1, 3, 16, 16), 255, 0)
    """
    import cv2

    out = np.empty((len(images), 3, *images.shape[2:]), np.uint8)
    for i, image in enumerate(images):
        grey = image[0] if image.shape[0] == 1 else cv2.cvtColor(np.ascontiguousarray(image.transpose(1, 2, 0)),
                                                                 cv2.COLOR_RGB2GRAY)
        out[i] = cv2.Canny(np.ascontiguousarray(grey), low, high)[None]
    return out


@functools.lru_cache(maxsize=None)
def palette(n: int) -> np.ndarray:
    """``n`` distinct RGB colours (uint8 (n, 3)), PASCAL VOC's colour map: class k's bits spread over
    the three channels' high bits, so neighbouring classes differ strongly.

    >>> palette(4).tolist()
    [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    """
    colours = np.zeros((n, 3), np.uint8)
    for k in range(n):
        c, rgb = k, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << shift
            c >>= 3
        colours[k] = rgb
    colours.flags.writeable = False  # cached: shared by every caller
    return colours


@functools.lru_cache(maxsize=1)
def _label_colours() -> np.ndarray:
    """A colour per label value, 255 (unlabelled) black."""
    colours = np.concatenate([palette(255), np.zeros((1, 3), np.uint8)])
    colours.flags.writeable = False
    return colours


def segmentation_map(images: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    """The sources' masks (N, h, w) as colour-coded maps (N, 3, H, W) at the images' size (nearest:
    labels do not blend); unlabelled pixels (255) black.

    >>> segmentation_map(np.zeros((1, 3, 4, 4), np.uint8), np.array([[[0, 1], [2, 255]]], np.uint8))[0, :, 0].tolist()
    [[0, 0, 128, 128], [0, 0, 0, 0], [0, 0, 0, 0]]
    """
    if masks is None:
        raise ValueError("control 'segmentation' colours each source's mask, and these images have none "
                         "(a data set with masks, such as the 'scenes' source, has them)")
    h, w = images.shape[2:]
    rows = (np.arange(h) * masks.shape[1]) // h
    cols = (np.arange(w) * masks.shape[2]) // w
    labels = masks[:, rows][:, :, cols]
    return np.ascontiguousarray(_label_colours()[labels].transpose(0, 3, 1, 2))


CONTROLS: Registry = Registry("control image kind", ValueError)
CONTROLS.register("canny", canny)
CONTROLS.register("segmentation", segmentation_map)
MASK_CONTROLS = {"segmentation"}  # controls made from the sources' masks: the data must have them
