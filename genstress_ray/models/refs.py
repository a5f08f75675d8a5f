"""References to models and loading them behind their protocols: what the driver, every Ray actor,
labelling, correction and assessment share. No Ray here: loading a model does not need it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from genstress_ray.models.loading import load_module
from genstress_ray.models.protocols import Classifier
from genstress_ray.models.registry import MODEL_KINDS
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


def load_generator(ref: ModelRef, image_shape, kind: str = "latent_generator", num_classes: int | None = None):
    """The generator at ``ref`` behind the protocol of its model ``kind`` (``MODEL_KINDS``)."""
    return MODEL_KINDS.get(kind).wrap(ref.load(), image_shape, num_classes).eval()
