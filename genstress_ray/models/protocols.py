"""The two model protocols every classifier and latent generator enters through.

A user's module only needs the shape of the protocol (a classifier maps images to logits; a latent
generator has ``encode`` and ``decode``); the wrappers here add what the pipeline needs to know
(class names, input shape, latent size) and check the module against it once, at load time.
"""

from __future__ import annotations

import torch
from torch import nn


class ModelError(ValueError):
    """A model could not be loaded, or does not fit the data it is asked to work on."""


class Classifier(nn.Module):
    """Batch of images (N, C, H, W) in [0, 1] -> logits (N, len(class_names)).

    Example:
        >>> from genstress_ray.models import get_model
        >>> clf = Classifier(get_model("small_cnn", in_shape=(1, 8, 8), num_classes=10),
        ...                  class_names=[str(i) for i in range(10)], input_shape=(1, 8, 8))
        >>> clf(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, net: nn.Module, class_names: list[str], input_shape: tuple[int, int, int]):
        super().__init__()
        self.net = net
        self.class_names = list(class_names)
        self.input_shape = tuple(int(s) for s in input_shape)
        self._check()

    def _check(self) -> None:
        with torch.no_grad():
            try:
                out = self.net(torch.zeros(1, *self.input_shape))
            except Exception as exc:
                raise ModelError(f"classifier does not accept images of shape {self.input_shape}: {exc}") from exc
        if out.ndim != 2 or out.shape[1] != len(self.class_names):
            raise ModelError(f"classifier gives {tuple(out.shape[1:])} outputs per image but the dataset has "
                             f"{len(self.class_names)} classes ({', '.join(self.class_names[:5])}...)")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class LatentGenerator(nn.Module):
    """``encode(images) -> (mean, log_variance)`` of the latent posterior, ``decode(latents) -> images``.

    Decoded images are in [0, 1] with ``image_shape``.
    """

    def __init__(self, net: nn.Module, image_shape: tuple[int, int, int]):
        super().__init__()
        for method in ("encode", "decode"):
            if not callable(getattr(net, method, None)):
                raise ModelError(f"latent generator {type(net).__name__} has no {method}() method")
        self.net = net
        self.image_shape = tuple(int(s) for s in image_shape)
        with torch.no_grad():
            try:
                mean, log_var = net.encode(torch.zeros(1, *self.image_shape))
                decoded = net.decode(mean)
            except Exception as exc:
                raise ModelError(f"latent generator does not accept images of shape {self.image_shape}: {exc}") from exc
        if tuple(decoded.shape[1:]) != self.image_shape or mean.shape != log_var.shape:
            raise ModelError(f"latent generator decodes to {tuple(decoded.shape[1:])}, expected {self.image_shape}")
        self.latent_dim = int(mean.shape[1])

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.encode(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net.decode(latents)
