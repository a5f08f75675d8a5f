"""Classifiers, latent generators and style-based generators behind three protocols, their registry,
loaders and training."""

from genstress_ray.models import architectures, diffusion, segmentation, stylegan  # noqa: F401  (register the built-ins)
from genstress_ray.models.loading import FORMATS, import_factory, load_module, save_checkpoint
from genstress_ray.models.protocols import Classifier, LatentGenerator, ModelError, StyleGenerator
from genstress_ray.models.refs import ModelRef, load_classifier, load_generator
from genstress_ray.models.registry import MODEL_KINDS, ModelKind, get_model, list_models, model_kind, register_model
from genstress_ray.models.training import (accuracy, cache_key, cached_model_uri, train_and_save, train_classifier,
                                           train_vae)

__all__ = ["FORMATS", "MODEL_KINDS", "ModelKind", "Classifier", "LatentGenerator", "ModelError", "ModelRef", "accuracy", "cache_key", "cached_model_uri",
           "get_model", "import_factory", "list_models", "load_classifier", "load_generator", "load_module", "model_kind", "register_model",
           "save_checkpoint", "StyleGenerator", "train_and_save", "train_classifier", "train_vae"]
