"""Control images that keep a source image's layout when it is regenerated (ControlNet conditioning).

``canny``: OpenCV's Canny edges, white on black, three channels (what SD 1.5 Canny/HED ControlNets
take). Registered in ``CONTROLS``; a data set with segmentation maps adds its own.
"""

from __future__ import annotations

import numpy as np

from genstress_ray.registry import Registry


def canny(images: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
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


CONTROLS: Registry = Registry("control image kind", ValueError)
CONTROLS.register("canny", canny)
