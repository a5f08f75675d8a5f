"""The two model protocols every classifier and latent generator enters through.

A user's module only needs the shape of the protocol (a classifier maps images to logits; a latent
generator has ``encode`` and ``decode``); the wrappers here add what the pipeline needs to know
(class names, input shape, latent size) and check the module against it once, at load time.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import torch
from torch import nn


class ModelError(ValueError):
    """A model could not be loaded, or does not fit the data it is asked to work on."""


# What loading a checkpoint or a model folder raises on a bad file (transformers and diffusers let
# torch's weights-only unpickler's errors through as they are).
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError, pickle.UnpicklingError)


def load_failure(exc: BaseException) -> str:
    """Why a load failed, in one line, never quoting the file. torch's own message for a pickle of
    Python objects advises loading it unsafely: that is not advice to pass on."""
    text = str(exc)
    if "Weights only load failed" in text:
        return "it holds pickled Python objects besides tensors, which are never unpickled (weights only)"
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


# ITU-R BT.601 luma, as PIL's RGB -> L conversion.
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class InputSpec:
    """What a classifier's network takes, and how [0, 1] images of any size are made into it.

    ``shape``: (channels, height, width) of the network's input. ``resize``: the side the shorter edge
    is scaled to before a centre crop to ``shape`` (the usual ImageNet evaluation: 256 then 224); None
    scales straight to ``shape``. ``mean``/``std``: per-channel normalisation after that (None: none).
    Grey images are repeated to three channels and RGB made grey by luma, so any generator's images
    can feed any classifier; other channel counts cannot be made and are refused.

    Example:
        >>> spec = InputSpec((3, 4, 4), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        >>> spec(torch.ones(2, 1, 8, 8)).shape, float(spec(torch.ones(1, 1, 8, 8)).max())
        (torch.Size([2, 3, 4, 4]), 1.0)
    """

    shape: tuple[int, int, int]
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) not in (1, self.shape[0]):
                    raise ModelError(f"classifier input {name} has {len(value)} values for {self.shape[0]} channels")
                object.__setattr__(self, name, value)
        if self.std is not None and min(self.std) <= 0:
            raise ModelError(f"classifier input std must be positive, got {self.std}")
        if self.resize is not None and self.resize < max(self.shape[1:]):
            raise ModelError(f"classifier input resize {self.resize} is smaller than its crop {self.shape[1:]}")

    def check(self, image_shape) -> None:
        """Refuse images of ``image_shape`` (C, H, W) this input cannot be made from."""
        have, want = int(image_shape[0]), self.shape[0]
        if have != want and {have, want} != {1, 3}:
            raise ModelError(f"the classifier takes {want}-channel images; images of shape {tuple(image_shape)} "
                             f"cannot be made into them (only grey <-> RGB is converted)")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        c, h, w = self.shape
        if images.shape[1] != c:
            images = images.expand(-1, 3, -1, -1) if c == 3 else \
                (images * images.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if tuple(images.shape[-2:]) != (h, w):
            images = self._resized(images, h, w)
        if self.mean is not None or self.std is not None:
            mean = images.new_tensor(self.mean or (0.0,)).view(1, -1, 1, 1)
            std = images.new_tensor(self.std or (1.0,)).view(1, -1, 1, 1)
            images = (images - mean) / std
        return images

    def _resized(self, images: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if self.resize is None:
            size = (h, w)
        else:
            ih, iw = images.shape[-2:]
            scale = self.resize / min(ih, iw)
            size = (max(h, round(ih * scale)), max(w, round(iw * scale)))
        images = nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (size[0] - h) // 2, (size[1] - w) // 2
        return images[..., top: top + h, left: left + w]


class Classifier(nn.Module):
    """Batch of images (N, C, H, W) in [0, 1] -> logits (N, len(class_names)).

    ``input_shape`` is the shape of the images it is given (the run's); ``input_spec`` what its
    network takes (default: those images as they are). Images are made into the network's input here,
    so a generator at one resolution can test a classifier at another. ``class_index`` picks, in the
    run's class order, the network's outputs (a classifier over more classes, or in another order).

    Example:
        >>> from genstress_ray.models import get_model
        >>> clf = Classifier(get_model("small_cnn", in_shape=(1, 8, 8), num_classes=10),
        ...                  class_names=[str(i) for i in range(10)], input_shape=(1, 8, 8))
        >>> clf(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, net: nn.Module, class_names: list[str], input_shape: tuple[int, int, int],
                 input_spec: InputSpec | None = None, class_index: list[int] | None = None):
        super().__init__()
        self.net = net
        self.class_names = list(class_names)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.input_spec = input_spec
        if input_spec is not None:
            input_spec.check(self.input_shape)
        self.register_buffer("class_index", None if class_index is None else torch.tensor(class_index), persistent=False)
        self._check()

    def _check(self) -> None:
        with torch.no_grad():
            try:
                out = self.net(self.prepare(torch.zeros(1, *self.input_shape)))
            except Exception as exc:
                takes = self.input_spec.shape if self.input_spec else self.input_shape
                raise ModelError(f"classifier does not accept images of shape {takes}: {exc}") from exc
        if self.class_index is not None and out.ndim == 2 and int(self.class_index.max()) >= out.shape[1]:
            raise ModelError(f"classifier gives {out.shape[1]} outputs per image, fewer than its class list")
        out = out if self.class_index is None else out[:, self.class_index]
        if out.ndim != 2 or out.shape[1] != len(self.class_names):
            raise ModelError(f"classifier gives {tuple(out.shape[1:])} outputs per image but the dataset has "
                             f"{len(self.class_names)} classes ({', '.join(self.class_names[:5])}...)")

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The run's images made into the network's input (resize, crop, channels, normalisation)."""
        return images if self.input_spec is None else self.input_spec(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.net(self.prepare(images))
        return logits if self.class_index is None else logits[:, self.class_index]


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
        # A generator with a resolution of its own (``image_size``: an AutoencoderKL) gets the run's images
        # resized to it, and its decodes resized back; any other must work at the run's shape.
        native = getattr(net, "image_size", None)
        self._to_native = self._to_run = None
        if native is not None and tuple(native) != self.image_shape:
            self._to_native, self._to_run = InputSpec(tuple(native)), InputSpec(self.image_shape)
            self._to_native.check(self.image_shape)
        with torch.no_grad():
            try:
                mean, log_var = self.encode(torch.zeros(1, *self.image_shape))
                decoded = self.decode(mean)
            except Exception as exc:
                raise ModelError(f"latent generator does not accept images of shape {self.image_shape}: {exc}") from exc
        if tuple(decoded.shape[1:]) != self.image_shape or mean.shape != log_var.shape:
            raise ModelError(f"latent generator decodes to {tuple(decoded.shape[1:])}, expected {self.image_shape}")
        self.latent_dim = int(mean.shape[1])

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.encode(images if self._to_native is None else self._to_native(images))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.net.decode(latents)
        return images if self._to_run is None else self._to_run(images)


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
