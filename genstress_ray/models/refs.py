"""References to models and loading them behind their protocols: what the driver, every Ray actor,
labelling, correction and assessment share. No Ray here: loading a model does not need it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from genstress_ray.models.diffusion_generators import diffusion_generator
from genstress_ray.models.loading import load_module
from genstress_ray.models.protocols import Classifier, LatentGenerator, StyleGenerator
from genstress_ray.storage import resolve_uri


@dataclass(frozen=True)
class ModelRef:
    """Everything an actor needs to load a model by itself."""

    uri: str
    format: str = "auto"
    architecture: str | None = None
    factory: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "uri", resolve_uri(self.uri))  # actors run in other working directories

    def load(self):
        module, _ = load_module(self.uri, self.format, self.architecture, self.factory, self.params)
        return module


def load_classifier(ref: ModelRef, class_names: list[str], image_shape) -> Classifier:
    return Classifier(ref.load(), class_names, image_shape).eval()


# Generator kind (a strategy's ``generator_kind``) -> its protocol wrapper (module, image shape, classes).
GENERATOR_PROTOCOLS = {
    "latent_generator": lambda net, shape, classes: LatentGenerator(net, shape),
    "style_generator": StyleGenerator,
    "diffusion_model": diffusion_generator,
}


def load_generator(ref: ModelRef, image_shape, kind: str = "latent_generator", num_classes: int | None = None):
    """The generator at ``ref`` behind the protocol of ``kind`` (see ``GENERATOR_PROTOCOLS``)."""
    return GENERATOR_PROTOCOLS[kind](ref.load(), image_shape, num_classes).eval()
