"""A registry of model architectures by name, in torchvision's ``register_model``/``get_model`` style."""

from __future__ import annotations

from typing import Callable

from torch import nn

from genstress_ray.models.protocols import ModelError

_MODELS: dict[str, tuple[str, Callable[..., nn.Module]]] = {}
KINDS = ("classifier", "latent_generator", "style_generator", "diffusion_model")


def register_model(name: str, kind: str):
    """Decorator registering an architecture factory ``fn(**params) -> nn.Module`` under ``name``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")

    def wrap(fn):
        if name in _MODELS:
            raise ValueError(f"architecture {name!r} is already registered (registered: {', '.join(list_models())})")
        _MODELS[name] = (kind, fn)
        return fn

    return wrap


def list_models(kind: str | None = None) -> list[str]:
    return sorted(n for n, (k, _) in _MODELS.items() if kind is None or k == kind)


def model_kind(name: str) -> str:
    if name not in _MODELS:
        raise ModelError(f"unknown architecture {name!r}; allowed: {', '.join(list_models())}")
    return _MODELS[name][0]


def get_model(name: str, **params) -> nn.Module:
    """A freshly initialised ``name`` architecture built with ``params``."""
    model_kind(name)
    try:
        return _MODELS[name][1](**params)
    except (TypeError, ValueError) as exc:  # a wrong or unknown parameter, an image size it cannot take
        raise ModelError(f"architecture {name!r} cannot be built with {params}: {exc}") from None
