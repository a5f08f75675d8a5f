"""The model registries: architectures by name, in torchvision's ``register_model``/``get_model``
style, and the model kinds they belong to.

A model kind is one ``ModelKind``: the protocol its models are used through, its trainer, its
default built-in and the name ``genstress train`` knows it by. Parts are named ``"module:attribute"``
and imported on first use, so this module imports no model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from genstress_ray.models.protocols import ModelError
from genstress_ray.registry import Registry, resolve


@dataclass(frozen=True)
class ModelKind:
    """A kind of model the package can load, train and use.

    Attributes:
        name: the kind (a strategy's ``generator_kind``; ``classifier`` for classifiers).
        command: its name in ``genstress train <command>``.
        protocol: wraps a loaded module: ``(net, image_shape, num_classes)`` for generators,
            ``(net, class_names, image_shape)`` for classifiers.
        trainer: ``(train, validation, architecture=, params=, **settings) -> (module, metrics)``.
        default: the built-in used when a config names no model of this kind: architecture and
            training settings.
        train_options: the ``genstress train`` options its trainer takes beyond epochs and seed.
    """

    name: str
    command: str
    protocol: str | Callable[..., nn.Module]
    trainer: str | Callable[..., tuple[nn.Module, dict]]
    default: dict[str, Any]
    train_options: tuple[str, ...] = field(default=())

    def wrap(self, net: nn.Module, *args) -> nn.Module:
        return resolve(self.protocol)(net, *args)

    def train(self, *args, **kwargs):
        return resolve(self.trainer)(*args, **kwargs)


MODEL_KINDS: Registry[ModelKind] = Registry("model kind", ModelError)
for _kind in (
    ModelKind("classifier", "classifier", "genstress_ray.models.protocols:Classifier",
              "genstress_ray.models.training:train_classifier",
              {"architecture": "small_cnn", "train": {"epochs": 5}}),
    ModelKind("latent_generator", "vae", "genstress_ray.models.protocols:LatentGenerator",
              "genstress_ray.models.training:train_vae",
              {"architecture": "beta_vae", "train": {"epochs": 20, "beta": 4.0}}, ("beta",)),
    ModelKind("style_generator", "stylegan", "genstress_ray.models.protocols:StyleGenerator",
              "genstress_ray.models.gan_training:train_stylegan",
              {"architecture": "small_stylegan", "train": {"epochs": 4}}, ("max_minutes", "reference")),
    ModelKind("diffusion_model", "ddpm", "genstress_ray.models.diffusion_generators:diffusion_generator",
              "genstress_ray.models.diffusion:train_ddpm",
              {"architecture": "small_ddpm", "train": {"epochs": 8}}, ("max_minutes",)),
    ModelKind("segmenter", "segmenter", "genstress_ray.models.segmentation:Segmenter",
              "genstress_ray.models.segmentation:train_segmenter",
              {"architecture": "small_segnet", "train": {"epochs": 5}}),
):
    MODEL_KINDS.register(_kind.name, _kind)

_MODELS: Registry[tuple[str, Callable[..., nn.Module]]] = Registry("architecture", ModelError)


def register_model(name: str, kind: str):
    """Decorator registering an architecture factory ``fn(**params) -> nn.Module`` under ``name``."""
    MODEL_KINDS.get(kind)

    def wrap(fn):
        _MODELS.register(name, (kind, fn))
        return fn

    return wrap


def list_models(kind: str | None = None) -> list[str]:
    return sorted(n for n in _MODELS if kind is None or _MODELS.get(n)[0] == kind)


def model_kind(name: str) -> str:
    if name not in _MODELS:
        raise ModelError(f"unknown architecture {name!r}; allowed: {', '.join(list_models())}")
    return _MODELS.get(name)[0]


def get_model(name: str, **params) -> nn.Module:
    """A freshly initialised ``name`` architecture built with ``params``."""
    model_kind(name)
    try:
        return _MODELS.get(name)[1](**params)
    except (TypeError, ValueError) as exc:  # a wrong or unknown parameter, an image size it cannot take
        raise ModelError(f"architecture {name!r} cannot be built with {params}: {exc}") from None
