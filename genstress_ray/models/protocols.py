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

    def __init__(self, net: nn.Module, image_shape: tuple[int, int, int], num_classes: int | None = None):
        super().__init__()  # num_classes: the generator protocols' common signature; a VAE needs none
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


def _attr(net: nn.Module, name: str, default=None):
    """``net.<name>``, else the same attribute on its mapping network (where StyleGAN2/3 keep
    ``w_avg``, ``z_dim`` and ``c_dim``)."""
    value = getattr(net, name, None)
    if value is None:
        value = getattr(getattr(net, "mapping", None), name, None)
    return default if value is None else value


class StyleGenerator(nn.Module):
    """A style-based generator: ``mapping(z, c) -> w``, ``synthesis(ws) -> images``, ``num_ws``, ``w_avg``.

    This is the public surface of StyleGAN2/3 (NVlabs' ``Generator``), so a user's pretrained
    generator enters as it is, built by a factory (``package.module:function``) and loaded from a
    weights URI. ``mapping`` may return one w per image (N, w_dim), which is broadcast to every layer,
    or StyleGAN's (N, num_ws, w_dim). ``synthesis`` returns images in ``output_range`` (StyleGAN's
    [-1, 1] by default); this wrapper hands them on in [0, 1]. ``c_dim`` is the number of classes a
    conditional generator takes as a one-hot ``c``; 0 for an unconditional one.

    The flat latent of a candidate (its row in the ``samples`` table) is its styles, ws flattened to
    ``num_ws * w_dim``; ``decode`` turns such latents back into images.

    Example:
        >>> from genstress_ray.models import get_model
        >>> g = StyleGenerator(get_model("small_stylegan", in_shape=(1, 8, 8), num_classes=10, channels=(8, 8, 8)),
        ...                    image_shape=(1, 8, 8), num_classes=10)
        >>> ws = g.mapping(torch.zeros(2, g.z_dim), g.one_hot(torch.tensor([3, 4])))
        >>> ws.shape, g.synthesis(ws).shape
        (torch.Size([2, 7, 64]), torch.Size([2, 1, 8, 8]))
    """

    def __init__(self, net: nn.Module, image_shape: tuple[int, int, int], num_classes: int | None = None,
                 output_range: tuple[float, float] = (-1.0, 1.0)):
        super().__init__()
        for method in ("mapping", "synthesis"):
            if not callable(getattr(net, method, None)):
                raise ModelError(f"style generator {type(net).__name__} has no {method}() method "
                                 "(the protocol: mapping(z, c) -> w, synthesis(ws) -> images, num_ws, w_avg)")
        missing = [a for a in ("num_ws", "w_avg", "z_dim") if _attr(net, a) is None]
        if missing:
            raise ModelError(f"style generator {type(net).__name__} has no {', '.join(missing)} attribute")
        self.net = net
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_ws, self.z_dim = int(_attr(net, "num_ws")), int(_attr(net, "z_dim"))
        self.c_dim = int(_attr(net, "c_dim", 0))
        self.output_range = tuple(float(v) for v in output_range)
        if self.c_dim and num_classes is not None and self.c_dim != num_classes:
            raise ModelError(f"style generator is conditioned on {self.c_dim} classes but the classifier and "
                             f"dataset have {num_classes}")
        with torch.no_grad():
            try:
                ws = self.mapping(torch.zeros(1, self.z_dim), self.one_hot(torch.zeros(1, dtype=torch.long)))
                images = self.synthesis(ws)
            except ModelError:
                raise
            except Exception as exc:
                raise ModelError(f"style generator does not run mapping -> synthesis: {exc}") from exc
        if tuple(images.shape[1:]) != self.image_shape:
            raise ModelError(f"style generator makes images of shape {tuple(images.shape[1:])}, but the classifier "
                             f"and dataset use {self.image_shape}")
        self.w_dim = int(ws.shape[2])
        self.latent_dim = self.num_ws * self.w_dim

    @property
    def w_avg(self) -> torch.Tensor:
        return _attr(self.net, "w_avg")

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """Conditioning for class ``labels``: one-hot (N, c_dim), or (N, 0) for an unconditional generator."""
        if not self.c_dim:
            return torch.zeros(len(labels), 0, device=labels.device)
        return torch.nn.functional.one_hot(labels.clamp_min(0), self.c_dim).float()

    def mapping(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Styles (N, num_ws, w_dim) for codes ``z`` (N, z_dim) and conditioning ``c``."""
        ws = self.net.mapping(z, c)
        if ws.ndim == 2:
            ws = ws.unsqueeze(1).expand(-1, self.num_ws, -1)
        if ws.ndim != 3 or ws.shape[1] != self.num_ws:
            raise ModelError(f"style generator mapping returned shape {tuple(ws.shape)}, expected "
                             f"(N, {self.num_ws}, w_dim) or (N, w_dim)")
        return ws

    def synthesis(self, ws: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] for styles (N, num_ws, w_dim)."""
        lo, hi = self.output_range
        return ((self.net.synthesis(ws) - lo) / (hi - lo)).clamp(0, 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images for flat latents (N, num_ws * w_dim), as stored in the ``samples`` table."""
        return self.synthesis(latents.reshape(len(latents), self.num_ws, -1))
