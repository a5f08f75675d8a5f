"""A run's context, without Ray: its typed config, store, classes, image shape and model references.

Everything that acts on a run (the pipeline, labelling, correction, assessment, the report, the CLI,
benchmarks) starts from a ``RunContext``: ``RunContext.open(run_uri)`` for an existing run (its
manifest is read and its config parsed once, here), ``RunContext.from_config(cfg, store)`` for a run
being started or resumed (models are trained or found in the cache). Loading a model, a data split
or the config's oracle goes through it.

Example:
    >>> ctx = RunContext.open("genstress-runs/demo/r1")  # doctest: +SKIP
    >>> ctx.class_names, ctx.image_shape, ctx.models["classifier"].uri  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from genstress_ray.config import CampaignConfig, ConfigError, DataSpec, ModelSpec
from genstress_ray.data import Catalog, DataError, DatasetSource, ImageSet, get_source
from genstress_ray.metrics import fit_temperature
from genstress_ray.models import (ModelError, ModelRef, cached_model_uri, load_classifier, load_generator, model_kind,
                                  train_and_save)
from genstress_ray.runs import run_config, with_overrides
from genstress_ray.storage import RunStore, StorageError
from genstress_ray.strategies import Strategy

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _named(field: str):
    """Re-raise a DataError naming the config ``field`` its data came from."""
    try:
        yield
    except DataError as exc:
        msg = str(exc)
        raise DataError(f"{field}.{msg[5:]}" if msg.startswith("data.") else f"{field}: {msg}") from None


def load_split(spec: DataSpec, field: str = "data") -> ImageSet:
    """The images of one ``DataSpec``; a DataError names the config ``field`` it came from."""
    with _named(field):
        return get_source(spec.kind, **spec.source_params()).load()


def open_source(spec: DataSpec, field: str = "data") -> tuple[DatasetSource, Catalog]:
    """The source of one ``DataSpec`` and its catalog (metadata only, for a streaming source)."""
    with _named(field):
        source = get_source(spec.kind, **spec.source_params())
        return source, source.catalog()


def check_disjoint(cfg: CampaignConfig) -> dict[str, int]:
    """Refuse a campaign whose search images are also its validation or test images (by each row's
    identity: ``DatasetSource.origin_ids``), before any work; returns the three splits' sizes.

    A search over images the strategy makes itself (seeds, noise: ``Strategy.source_rows``) uses no
    data image, so nothing can overlap.

    Raises:
        DataError: naming the two fields, the overlap count and the fix.
    """
    search_source, _ = open_source(cfg.data.search, "data.search")
    if cfg.strategy.plugin.source_rows is not None:
        return {}
    search = search_source.origin_ids()
    sizes = {"search": len(search)}
    for name, spec in (("data.validation", cfg.data.validation_spec()), ("correction.test", cfg.test_spec())):
        try:
            held = open_source(spec, name)[0].origin_ids()
        except DataError:  # no such split here (a search-only folder): nothing to overlap; its users say so
            continue
        sizes[name] = len(held)
        shared = len(search & held)
        if not shared:
            continue
        if name == "correction.test" and cfg.correction.test is None:
            fix = ("give data.search a share of its split, e.g. `share: [0.0, 0.5]` (the default test split is then "
                   "the other half), or name a test split of other images in correction.test")
            name = "the default test split (correction.test unset)"
        else:
            fix = f"name a split of other images in {name}, or search another split"
        raise DataError(f"data.search and {name} share {shared} of the search's {len(search)} images: search and "
                        f"evaluation must never use the same image (a verdict measured on searched images says "
                        f"nothing about held-out ones). Fix: {fix}")
    return sizes


def model_ref(spec: ModelSpec, uri: str) -> ModelRef:
    """The reference a run uses for a model: the configured checkpoint, or the cached built-in at ``uri``."""
    declared = spec.input.model_dump() if spec.input else None
    if spec.uri:
        return ModelRef(spec.uri, spec.format, spec.architecture, spec.factory, spec.params, declared, spec.task)
    return ModelRef(uri, "safetensors", spec.architecture, None, spec.params, declared, spec.task)


def prepare_model(role: str, spec: ModelSpec, cfg: CampaignConfig, class_names: list[str], image_shape) -> ModelRef:
    """The checkpoint to use for ``role``: the configured one, or a built-in trained once and cached."""
    expected = {"generator": cfg.strategy.generator_kind, "detector": "latent_generator"}.get(
        role, "segmenter" if spec.task == "segmentation" else "classifier")
    if spec.architecture and model_kind(spec.architecture) != expected:
        raise ModelError(f"{role}.architecture: {spec.architecture!r} is a {model_kind(spec.architecture)}, "
                         f"not a {expected}")
    if spec.uri:
        return model_ref(spec, spec.uri)
    train_spec, val_spec = cfg.data.train_spec(), cfg.data.validation_spec()
    recipe = {"architecture": spec.architecture, "params": spec.params, "train": spec.train,
              "data": train_spec.model_dump(), "validation": val_spec.model_dump(), "threads": cfg.threads}
    uri, cached = cached_model_uri(cfg.cache, expected, recipe)
    if cached:
        log.info("%s: using cached %s", role, uri)
        return model_ref(spec, uri)
    log.info("%s: training built-in %s (cached at %s)", role, spec.architecture, uri)
    train = load_split(train_spec, "data.train" if cfg.data.train else "data.search")
    val = load_split(val_spec, "data.validation" if cfg.data.validation else "data.search")
    if tuple(train.image_shape) != tuple(image_shape) or train.class_names != class_names:
        raise DataError(f"data.train: images {train.image_shape} / classes {train.class_names} differ from "
                        f"data.search: {tuple(image_shape)} / {class_names}")
    metrics = train_and_save(expected, spec.architecture, train, val, uri, spec.params, spec.train, cfg.threads)
    log.info("%s: trained %s", role, metrics)
    return model_ref(spec, uri)


@dataclass
class RunContext:
    """What every consumer of a run needs, read once. ``models`` maps ``classifier`` and ``generator``
    to the references the run uses; ``manifest`` is the manifest as read (``{}`` for a new run)."""

    cfg: CampaignConfig
    store: RunStore
    class_names: list[str]
    image_shape: tuple[int, ...]
    models: dict[str, ModelRef]
    manifest: dict[str, Any] = field(default_factory=dict)
    _search: ImageSet | None = None
    _source: tuple[DatasetSource, Catalog] | None = None

    @classmethod
    def open(cls, run_uri: str, config=None, storage_options: dict | None = None,
             overrides: dict[str, dict] | None = None) -> "RunContext":
        """The context of an existing run.

        Args:
            run_uri: ``<output>/<campaign>/<run_id>``.
            config: the campaign's own config, needed when the run names code to import
                (``genstress_ray.runs.run_config``).
            overrides: config sections to change, validated: ``{"correction": {"lambdas": [1.0]}}``.
        """
        store = RunStore.from_uri(run_uri, storage_options)
        manifest = store.read_manifest()
        cfg = run_config(store, config, manifest)
        for section, values in (overrides or {}).items():
            cfg = with_overrides(cfg, section, values)
        missing = [k for k in ("class_names", "image_shape", "models") if k not in manifest]
        if missing:
            raise StorageError(f"run {store.uri}: its manifest lacks {', '.join(missing)} (made by an older "
                               "genstress_ray, or the run never got past its start); rerun it with the same run id")
        torch.set_num_threads(cfg.threads)
        models = {role: model_ref(getattr(cfg, role), uri) for role, uri in manifest["models"].items()}
        return cls(cfg, store, manifest["class_names"], tuple(manifest["image_shape"]), models, manifest)

    @classmethod
    def from_config(cls, cfg: CampaignConfig, store: RunStore, manifest: dict | None = None) -> "RunContext":
        """The context of a run being started or resumed: loads ``data.search`` and prepares (trains
        or finds in the cache) the classifier and generator; bad data or models fail here, named.
        ``manifest``: the run's, when the caller has read it (``{}`` for a new run)."""
        torch.set_num_threads(cfg.threads)
        source, catalog = open_source(cfg.data.search, "data.search")
        if catalog.rows == 0:
            raise DataError("data.search: the split holds no images")
        needs = ("the model under test is a segmentation model (classifier.task)" if cfg.classifier.task == "segmentation"
                 else "the strategy's control images are made from masks" if cfg.strategy.needs_masks else None)
        if needs and not catalog.masks:
            raise DataError(f"data.search: {needs}, and the {cfg.data.search.kind!r} source has no masks "
                            f"(the 'scenes' source has)")
        manifest = store.read_manifest() if manifest is None else manifest
        ctx = cls(cfg, store, catalog.class_names, tuple(catalog.image_shape), {}, manifest, _source=(source, catalog))
        ctx.models = {role: ctx.prepare(role, getattr(cfg, role)) for role in ("classifier", "generator")}
        return ctx

    # ---- what the run is made of ---------------------------------------------------------------
    @property
    def strategy(self) -> Strategy:
        return self.cfg.strategy.plugin

    @property
    def segmentation(self) -> bool:
        """Whether the model under test is a segmentation model (``classifier.task``)."""
        return self.cfg.classifier.task == "segmentation"

    def refuse_segmentation(self, command: str, why: str) -> None:
        """A clear refusal of what a segmentation run cannot do (yet)."""
        if self.segmentation:
            raise ConfigError(f"run {self.store.uri} tests a segmentation model (classifier.task: segmentation): "
                              f"{command} {why}")

    @property
    def search(self) -> ImageSet:
        """The ``data.search`` images, in memory (loaded on first use; the search itself streams them:
        ``search_source``)."""
        if self._search is None:
            self._search = load_split(self.cfg.data.search, "data.search")
        return self._search

    def _opened(self) -> tuple[DatasetSource, Catalog]:
        if self._source is None:
            self._source = open_source(self.cfg.data.search, "data.search")
        return self._source

    @property
    def search_source(self) -> DatasetSource:
        """The ``data.search`` source, whose shards the search reads."""
        return self._opened()[0]

    @property
    def catalog(self) -> Catalog:
        """Class names, image shape and row count of ``data.search``, without its pixels."""
        return self._opened()[1]

    def prepare(self, role: str, spec: ModelSpec) -> ModelRef:
        """The checkpoint for a model of the config (``oracle``, the assessment's ``detector``, ...)."""
        return prepare_model(role, spec, self.cfg, self.class_names, self.image_shape)

    def classifier(self, ref: ModelRef | None = None):
        """The classifier under test (or the one at ``ref``), behind its protocol."""
        return load_classifier(ref or self.models["classifier"], self.class_names, self.image_shape)

    def generator(self):
        """The run's generator behind the protocol of the strategy's generator kind."""
        return load_generator(self.models["generator"], self.image_shape, self.cfg.strategy.generator_kind,
                              len(self.class_names))

    def oracle_ref(self) -> ModelRef:
        """The checkpoint of the config's ``oracle`` classifier (trained and cached on first use)."""
        if self.cfg.oracle is None:
            raise ModelError(f"run {self.store.uri}: its config has no 'oracle' section; give a checkpoint to --oracle")
        return self.prepare("oracle", self.cfg.oracle)

    def oracle(self):
        """The config's ``oracle`` classifier, ready to label."""
        return self.classifier(self.oracle_ref())

    # ---- what its stages are built with ------------------------------------------------------------
    def check_generator(self):
        """Load the generator on the driver and let the strategy check it, so a bad generator or layer
        set fails before any Ray work."""
        generator = self.generator()
        if self.strategy.check_generator is not None:
            try:
                self.strategy.check_generator(self.cfg.strategy, generator)
            except ValueError as exc:
                raise ModelError(str(exc)) from None
        return generator

    def boundary(self) -> dict | None:
        """For a strategy scored against a set of classes (KLDB), what every stage scores against."""
        if self.strategy.boundary is None:
            return None
        try:
            return self.strategy.boundary(self.cfg.strategy, self.class_names, self.classifier_temperature)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def classifier_temperature(self) -> float:
        """The temperature that calibrates the classifier on the validation split (``fit_temperature``)."""
        validation = load_split(self.cfg.data.validation_spec())
        classifier = self.classifier()
        x, y = validation.tensors()
        with torch.no_grad():
            logits = torch.cat([classifier(chunk) for chunk in x.split(1024)])
        temperature = fit_temperature(logits, y)
        log.info("classifier temperature %.3f (fitted on %d validation images)", temperature, len(y))
        return temperature

    def stage_constructor(self, boundary: dict | None = None) -> dict:
        """What every model stage of the run is built with (Ray's ``fn_constructor_kwargs``); ``boundary``
        is ``boundary()``'s for the search stages (correction judges against labels instead)."""
        return {"classifier": self.models["classifier"], "generator": self.models["generator"],
                "class_names": self.class_names, "image_shape": tuple(self.image_shape), "seed": self.cfg.seed,
                "generator_kind": self.cfg.strategy.generator_kind, "boundary": boundary,
                "strategy": self.cfg.strategy.name,
                **({"segmentation": {"miou_drop": self.cfg.strategy.miou_drop}} if self.segmentation else {})}
