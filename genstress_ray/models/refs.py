"""References to models and loading them behind their protocols: what the driver, every Ray actor,
labelling, correction and assessment share. No Ray here: loading a model does not need it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from genstress_ray.models.loading import load_module
from genstress_ray.models.protocols import Classifier, InputSpec, ModelError
from genstress_ray.models.registry import MODEL_KINDS
from genstress_ray.storage import resolve_uri


@dataclass(frozen=True)
class ModelRef:
    """Everything an actor needs to load a model by itself. ``input``: a classifier's ``InputSpec``
    fields, where the config declares them (a transformers folder carries its own)."""

    uri: str
    format: str = "auto"
    architecture: str | None = None
    factory: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    input: dict[str, Any] | None = None
    task: str = "classification"  # or "segmentation": load_classifier gives a Segmenter

    def __post_init__(self):
        object.__setattr__(self, "uri", resolve_uri(self.uri))  # actors run in other working directories

    def load(self):
        return self.load_with_meta()[0]

    def load_with_meta(self):
        """The module and the checkpoint's metadata (``load_module``)."""
        return load_module(self.uri, self.format, self.architecture, self.factory, self.params)


def class_index(model_names: list[str] | None, class_names: list[str]) -> list[int] | None:
    """Which of a classifier's outputs are the run's classes, in the run's order; None: all, as they are.

    A classifier that names its classes (a transformers ``id2label``) is matched by name: its classes
    may come in another order, or be a superset (an ImageNet model on a class subset: only the
    subset's logits count). Unnamed or differently named outputs are taken in order.

    >>> class_index(["cat", "dog", "fox"], ["fox", "cat"])
    [2, 0]
    """
    if not model_names or list(model_names) == list(class_names):
        return None
    position = {name: i for i, name in enumerate(model_names)}
    if all(name in position for name in class_names):
        return [position[name] for name in class_names]
    if len(model_names) == len(class_names):
        return None  # e.g. LABEL_0..LABEL_9 against digits: the outputs are the classes, in order
    missing = [name for name in class_names if name not in position]
    raise ModelError(f"the classifier's {len(model_names)} classes lack {len(missing)} of the data's "
                     f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")


def load_classifier(ref: ModelRef, class_names: list[str], image_shape) -> Classifier:
    """The classifier at ``ref`` behind its protocol, taking the run's images of ``image_shape`` (for
    a ``segmentation`` ref, the ``Segmenter`` over the data's mask classes)."""
    module, meta = ref.load_with_meta()
    if ref.task == "segmentation":
        return load_segmenter(module, meta, class_names, image_shape)
    # A built-in checkpoint says the shape it was trained at (``params.in_shape``): data of another
    # size is resized to it.
    trained = meta.get("params", {}).get("in_shape")
    spec = ref.input or meta.get("input") or ({"shape": trained} if trained else None)
    return Classifier(module, class_names, image_shape, InputSpec(**spec) if spec else None,
                      class_index(meta.get("class_names"), class_names)).eval()


def load_generator(ref: ModelRef, image_shape, kind: str = "latent_generator", num_classes: int | None = None):
    """The generator at ``ref`` behind the protocol of its model ``kind`` (``MODEL_KINDS``)."""
    return MODEL_KINDS.get(kind).wrap(ref.load(), image_shape, num_classes).eval()


def load_segmenter(module, meta: dict, class_names: list[str], image_shape):
    """A loaded segmentation network behind the ``Segmenter`` protocol; a checkpoint that names its
    classes must name the masks' classes, in their order (a pixel's class index is its mask value)."""
    named = meta.get("class_names")
    if named and list(named) != list(class_names):
        raise ModelError(f"classifier: the segmentation model's classes {list(named)} differ from the masks' "
                         f"{list(class_names)}")
    return MODEL_KINDS.get("segmenter").wrap(module, class_names, image_shape).eval()
