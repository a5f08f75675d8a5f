"""The campaign config: typed, validated models loaded from YAML.

Everything is checked here, before any Ray work starts; errors name the field and the allowed values.
``StageResources.ray_args`` is the one place resource settings turn into Ray arguments.

Example:
    >>> cfg = CampaignConfig.model_validate({"campaign": "doc", "data": {"search": {"kind": "digits"}}})
    >>> cfg.strategy.name, cfg.resources.search.batch_size
    ('defuse', 64)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from genstress_ray.data import SPLITS, list_sources, source_options
from genstress_ray.models import FORMATS, MODEL_KINDS, list_models, model_kind
from genstress_ray.storage import StorageError, check_name, default_cache, resolve_uri
from genstress_ray.strategies import STRATEGIES

# A path or URI: a local path is made absolute when the config is loaded (see ``resolve_uri``), so
# Ray workers, whose working directories differ from the driver's, read and write the same place.
def _location(value: str) -> str:
    try:
        return resolve_uri(value)
    except StorageError as exc:  # "" would name the current folder
        raise ValueError(str(exc)) from None


def _name(value: str) -> str:
    try:
        return check_name("", value)
    except StorageError as exc:  # "." and ".." would name the output or a folder above it
        raise ValueError(str(exc)) from None


Location = Annotated[str, AfterValidator(_location)]
# A campaign, run or scan name: one folder name inside the output.
Name = Annotated[str, AfterValidator(_name)]


class ConfigError(ValueError):
    """The campaign config is invalid. Each line names a field."""


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(text: str):
    """A YAML document, safely loaded, duplicate keys refused (``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)


def _one_of(value: str, allowed, what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    return value


class _Strict(BaseModel):
    # Infinity and NaN are never a setting; they would only fail inside a Ray task.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Every seed feeds numpy's and torch's generators: a negative one, or one past 64 bits, fails there.
Seed = Annotated[int, Field(ge=0, lt=2**63)]


class DataSpec(_Strict):
    """One dataset split: a registered source kind, where it lives, and how to cut it."""

    kind: str = "digits"
    uri: Location | None = None
    split: str = "test"
    limit: Annotated[int, Field(gt=0)] | None = None
    seed: Seed = 0
    validation_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    test_fraction: Annotated[float, Field(ge=0, le=1)] = 0.2  # 1: every image is test (a search-only folder)
    resize: Annotated[int, Field(gt=0)] | None = None
    # [lo, hi): the part of the split this spec takes, by a seeded hash of each row's key (applied
    # before ``limit``). Two specs of one split with disjoint shares never share an image: the search
    # takes [0, 0.5] of a test split, the evaluation the other half.
    share: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] | None = None
    options: dict[str, Any] = {}

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v):
        return _one_of(v, list_sources(), "dataset kind")

    @field_validator("split")
    @classmethod
    def _known_split(cls, v):
        return _one_of(v, SPLITS, "split")

    @field_validator("share")
    @classmethod
    def _share_is_a_range(cls, v):
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"share: {list(v)} is not a range [lo, hi) with lo < hi")
        return v

    def other_share(self) -> tuple[float, float] | None:
        """The rest of the split when this spec takes its first or last part; None when there is no
        one such range (the whole split, or a middle part)."""
        if self.share is None:
            return None
        lo, hi = self.share
        return (hi, 1.0) if lo == 0 and hi < 1 else (0.0, lo) if hi >= 1 and lo > 0 else None

    @model_validator(mode="after")
    def _fractions_fit(self):
        if self.validation_fraction + self.test_fraction > 1:
            raise ValueError(f"validation_fraction + test_fraction = {self.validation_fraction + self.test_fraction} "
                             "exceeds 1")
        return self

    @model_validator(mode="after")
    def _known_options(self):
        allowed = [o for o in source_options(self.kind) if o not in type(self).model_fields]
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise ValueError(f"options: the {self.kind} source takes no option {', '.join(map(repr, unknown))}; "
                             f"allowed: {', '.join(allowed) or 'none'}")
        return self

    def source_params(self) -> dict[str, Any]:
        return {"uri": self.uri, "split": self.split, "limit": self.limit, "seed": self.seed,
                "validation_fraction": self.validation_fraction, "test_fraction": self.test_fraction,
                "resize": self.resize, "share": self.share, **self.options}


class DataConfig(_Strict):
    """The images to search around, and the splits built-in models train and validate on.

    The default search takes half of the digits' test split (``share``); the other half is the test
    split every verdict is measured on (``CampaignConfig.test_spec``)."""

    search: DataSpec = DataSpec(share=(0.0, 0.5))
    train: DataSpec | None = None
    validation: DataSpec | None = None

    def train_spec(self) -> DataSpec:
        return self.train or self.search.model_copy(update={"split": "train", "limit": None, "share": None})

    def validation_spec(self) -> DataSpec:
        return self.validation or self.train_spec().model_copy(update={"split": "validation", "limit": None,
                                                                        "share": None})


class InputConfig(_Strict):
    """What a classifier's network takes, for checkpoints that do not say (TorchScript, state dicts):
    ``shape`` [C, H, W]; ``resize``: scale the shorter side to this before a centre crop; ``mean`` and
    ``std``: per-channel normalisation. A transformers folder brings its own."""

    shape: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]]
    resize: Annotated[int, Field(gt=0)] | None = None
    mean: list[float] | None = None
    std: list[Annotated[float, Field(gt=0)]] | None = None


class ModelSpec(_Strict):
    """A model: a checkpoint at ``uri`` (any fsspec URI), or, with no uri, a built-in trained once and cached.

    ``architecture`` names a registered model; ``factory`` ("package.module:function") builds a user's
    own; ``params`` go to either; ``train`` holds training settings for built-ins (epochs, lr, ...).
    ``input`` declares a classifier's input size and normalisation (``InputConfig``). ``task``: what
    the model under test (``classifier:``) does: ``classification`` (images -> class logits) or
    ``segmentation`` (images -> per-pixel logits over the data's mask classes; ``models.Segmenter``).
    """

    uri: Location | None = None
    task: Literal["classification", "segmentation"] = "classification"
    format: str = "auto"
    architecture: str | None = None
    factory: str | None = None
    params: dict[str, Any] = {}
    train: dict[str, Any] = {}
    input: InputConfig | None = None

    @field_validator("format")
    @classmethod
    def _known_format(cls, v):
        return _one_of(v, FORMATS, "checkpoint format")

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, v):
        return v if v is None else _one_of(v, list_models(), "architecture")


def _strategy_union():
    """Every registered strategy's parameters, told apart by ``name`` (a discriminated union names the
    allowed values in its errors)."""
    params = tuple(strategy.params for strategy in STRATEGIES.values())
    return Annotated[Union[params], Field(discriminator="name")] if len(params) > 1 else params[0]


StrategyConfig = _strategy_union()


class ReduceConfig(_Strict):
    """Distillation: the DP-GMM over failure latents and the per-region samples."""

    max_components: Annotated[int, Field(gt=0)] = 100
    weight_threshold: Annotated[float, Field(ge=0, lt=1)] = 0.01
    max_faults: Annotated[int, Field(gt=1)] = 50_000
    samples_per_region: Annotated[int, Field(ge=0)] = 100
    tau: Annotated[float, Field(gt=0)] = 1.0
    max_iter: Annotated[int, Field(gt=0)] = 500
    # Latents longer than this are clustered on their principal components (see regions.fit_regions).
    max_dims: Annotated[int, Field(gt=0)] = 32


class StageResources(_Strict):
    """How one Ray stage runs: actors, CPUs and GPUs per actor, batch size (source rows per batch),
    torch threads per actor, and candidates per forward pass (``chunk_size``)."""

    actors: Annotated[int, Field(gt=0)] = 1
    num_cpus: Annotated[float, Field(gt=0)] = 1.0
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    batch_size: Annotated[int, Field(gt=0)] = 64
    threads: Annotated[int, Field(gt=0)] | None = None
    chunk_size: Annotated[int, Field(gt=0)] = 512
    # CPUs of each task that reads and decodes a shard of a streaming source (image folders, Parquet).
    read_cpus: Annotated[float, Field(gt=0)] = 0.5

    def ray_args(self) -> dict[str, Any]:
        """Keyword arguments for ``Dataset.map_batches`` with a callable class."""
        from ray.data import ActorPoolStrategy

        # Ray Data schedules its actors with SPREAD: on a cluster they go to different nodes.
        return {"compute": ActorPoolStrategy(size=self.actors), "num_cpus": self.num_cpus, "num_gpus": self.num_gpus}

    def torch_threads(self) -> int:
        return self.threads or max(1, round(self.num_cpus))


class ResourcesConfig(_Strict):
    # Fractional CPUs by default: on a 2-core machine a pool holding every CPU starves the read tasks.
    search: StageResources = StageResources(num_cpus=0.5, threads=1)
    region_samples: StageResources = StageResources(num_cpus=0.5, threads=1, batch_size=256)


# The Defuse paper's lambda grid: 1e-10, 1e-9, ..., 0.1, 1, 2, 5, 10, 20, 100, 1000 (17 values).
PAPER_LAMBDAS = [1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 2.0, 5.0, 10.0, 20.0, 100.0,
                 1000.0]
# The default sweep: 9 of the paper's values, one per two decades or so (half the trials).
SHORT_LAMBDAS = [1e-10, 1e-5, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0]


class CorrectionConfig(_Strict):
    """Fine-tuning that fixes failure regions: L(D) + lambda * L(Df) with Ray Train, over a lambda sweep.

    Each failure region gets ``finetune_per_region`` fresh samples for Df (of which
    ``region_validation_fraction`` are held back to choose lambda) and ``test_per_region`` more for the
    region test set. The trial with the best ``select_by`` score wins: ``combined`` is the mean of
    validation accuracy on D and on the regions' validation samples, ``real_region`` the mean of D's
    and of the accuracy on the real validation images inside the failure regions, each against its
    own label (README, "Correction"), ``validation`` uses D alone. ``confirm_flagged``: failure
    regions whose label the labels table flags (``labeling.support``) that the correction may use
    all the same; the other flagged ones are left out.
    """

    lambdas: list[Annotated[float, Field(ge=0)]] = SHORT_LAMBDAS
    epochs: Annotated[int, Field(gt=0)] = 2
    lr: Annotated[float, Field(gt=0)] = 1e-4
    batch_size: Annotated[int, Field(gt=0)] = 128
    finetune_per_region: Annotated[int, Field(gt=1)] = 256
    test_per_region: Annotated[int, Field(gt=0)] = 256
    region_validation_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    select_by: Literal["combined", "validation", "real_region"] = "combined"
    # What Df holds for each failure region: its generated samples, its real training members with
    # the region's label, both, or the generated samples augmented (README, "Correction").
    region_data: Literal["generated", "real", "both", "augmented"] = "generated"
    # Membership radius of the real images in a region: this quantile of its own faults' distances.
    member_quantile: Annotated[float, Field(gt=0, lt=1)] = 0.9
    confirm_flagged: list[int] = []
    # Apply the accepted relabels of data repair (``genstress repair``) to D before fine-tuning.
    relabel: bool = False
    baseline: bool = True
    test: DataSpec | None = None
    workers: Annotated[int, Field(ge=0)] = 1
    num_cpus_per_worker: Annotated[float, Field(gt=0)] = 0.5
    use_gpu: bool = False
    max_concurrent_trials: Annotated[int, Field(gt=0)] | None = None
    threads: Annotated[int, Field(gt=0)] = 1
    # The trials' data streams from storage to the workers (Ray Data): CPUs of each read/decode task,
    # and how many of D's rows are shuffled together as they stream (its shards come in random order).
    read_cpus: Annotated[float, Field(gt=0)] = 0.25
    shuffle_rows: Annotated[int, Field(gt=0)] = 4096
    # Datasets whose decoded images fit in this many MiB (together, smallest first) are read once and
    # kept in Ray's object store for every trial and epoch; larger ones (ImageNet's D) stream from
    # storage each time. Reading D anew per trial and epoch made the MNIST job's sweep 3x slower.
    cache_mib: Annotated[int, Field(ge=0)] = 2048

    @field_validator("lambdas")
    @classmethod
    def _some_lambdas(cls, v):
        if not v:
            raise ValueError("the lambda list is empty: give at least one value (the default: "
                             f"{', '.join(str(x) for x in SHORT_LAMBDAS)})")
        return v


def default_model(kind: str) -> ModelSpec:
    """The built-in model of a kind (``MODEL_KINDS``), used when a config names none."""
    return ModelSpec.model_validate(MODEL_KINDS.get(kind).default)


class AssessmentConfig(_Strict):
    """How ``genstress assess`` measures a search's output (README, "Metrics").

    ``detector`` is the out-of-distribution check of validity: a beta-VAE trained on the real training
    split; an image is valid when its reconstruction error is at most the ``quantile`` of the errors
    on the real validation split. At most ``max_faults`` faults (a seeded sample) are assessed.
    ``features`` optionally replaces the classifier's penultimate features in KLDB's Frechet distance.
    """

    detector: ModelSpec = Field(default_factory=lambda: default_model("latent_generator"))
    quantile: Annotated[float, Field(gt=0, le=1)] = 0.99
    max_faults: Annotated[int, Field(gt=1)] = 5000
    # The feature network of KLDB's Frechet distance, e.g. Inception as TorchScript: a module that takes
    # [0, 1] images of the data's shape (resizing inside it) and returns (N, d) features. None: the
    # classifier's penultimate features.
    features: ModelSpec | None = None

    @field_validator("features")
    @classmethod
    def _features_from_a_checkpoint(cls, v):
        if v is not None and not v.uri:
            raise ValueError("give the feature network's checkpoint 'uri' (it is not trained here)")
        return v


class ChecksConfig(_Strict):
    """Checks before a search that it can mean something (README, "Guardrails").

    Generator fidelity: for a strategy that searches around the generator's encodings of the search
    images (``Strategy.fidelity``), the classifier's accuracy on the generator's reconstructions of
    ``fidelity_images`` search images (a seeded sample). Below ``min_fidelity`` the run is refused
    before the search, unless ``accept_low_fidelity``: its faults would be the generator's blur,
    not the classifier's failures.
    """

    min_fidelity: Annotated[float, Field(ge=0, le=1)] = 0.8
    fidelity_images: Annotated[int, Field(gt=0)] = 512
    accept_low_fidelity: bool = False


class RayConfig(_Strict):
    address: str | None = None
    num_cpus: Annotated[int, Field(gt=0)] | None = None
    object_store_memory: Annotated[int, Field(gt=0)] | None = None
    # What the driver reserves when the campaign is submitted as a job (genstress submit): it trains
    # built-in models, calibrates and evaluates, so a GPU for it is worth reserving on a GPU cluster.
    entrypoint_num_cpus: Annotated[float, Field(ge=0)] | None = None
    entrypoint_num_gpus: Annotated[float, Field(ge=0)] | None = None


class CampaignConfig(_Strict):
    """A whole campaign: what to search, with which models and strategy, where to write, on what resources."""

    campaign: Name = "campaign"
    seed: Seed = 0
    # Torch threads for the driver's own work (training built-ins, calibration, labelling, evaluation).
    # Set, not left to torch's default, because trained weights depend on the thread count.
    threads: Annotated[int, Field(gt=0)] = 1
    # Source rows per shard: the unit a stage writes, counts and resumes by (fixed for a run).
    shard_rows: Annotated[int, Field(gt=0)] = 256
    output: Location = Field(default="genstress-runs", validate_default=True)
    run_id: Name | None = None
    cache: Location = Field(default_factory=default_cache, validate_default=True)
    storage_options: dict[str, Any] = {}
    data: DataConfig = DataConfig()
    classifier: ModelSpec = Field(default_factory=lambda: default_model("classifier"))
    # None: the built-in generator of the strategy's generator kind, trained once and cached.
    generator: ModelSpec | None = None
    # The reference classifier that labels regions in benchmarks and nightly scans (``genstress label
    # RUN --oracle``); a built-in is trained once and cached like the other models.
    oracle: ModelSpec | None = None
    strategy: StrategyConfig = Field(default_factory=lambda: STRATEGIES.get("defuse").params())
    reduce: ReduceConfig = ReduceConfig()
    correction: CorrectionConfig = CorrectionConfig()
    assessment: AssessmentConfig = AssessmentConfig()
    checks: ChecksConfig = ChecksConfig()
    resources: ResourcesConfig = ResourcesConfig()
    ray: RayConfig = RayConfig()

    def test_spec(self) -> DataSpec:
        """The held-out images every verdict is measured on: ``correction.test``; else the search
        source's test split, without the part the search takes when the search is on that split
        itself (``DataSpec.share``: the search takes [0, 0.5], the test [0.5, 1]). A search over the
        whole test split leaves it no image of its own: ``context.check_disjoint`` refuses that."""
        if self.correction.test is not None:
            return self.correction.test
        search = self.data.search
        if search.split != "test":
            return search.model_copy(update={"split": "test", "limit": None, "share": None})
        return search.model_copy(update={"limit": None, "share": search.other_share() or search.share})

    @model_validator(mode="after")
    def _models_are_buildable(self):
        if self.generator is None:
            self.generator = default_model(self.strategy.generator_kind)
        self._check_task()
        for role, spec in (("classifier", self.classifier), ("generator", self.generator), ("oracle", self.oracle)):
            if spec is not None and spec.uri is None and spec.architecture is None:
                raise ValueError(f"{role}: give a checkpoint 'uri' or a built-in 'architecture' to train "
                                 f"(allowed: {', '.join(list_models())})")
        needed, arch = self.strategy.generator_kind, self.generator.architecture
        if arch is not None and model_kind(arch) != needed:
            raise ValueError(f"generator.architecture: strategy {self.strategy.name!r} needs a {needed} "
                             f"({', '.join(list_models(needed))}), and {arch!r} is a {model_kind(arch)}")
        return self

    def _check_task(self) -> None:
        """A segmentation model under test: the built-in one unless a model is named, and a strategy
        that keeps each source's layout (its mask is the ground truth)."""
        for role in ("generator", "oracle"):
            spec = getattr(self, role)
            if spec is not None and spec.task != "classification":
                raise ValueError(f"{role}.task: only the model under test ('classifier:') may be a segmentation model")
        spec = self.classifier
        if spec.task != "segmentation":
            return
        if not self.strategy.plugin.segmentation:
            able = [s.name for s in STRATEGIES.values() if s.segmentation]
            raise ValueError(f"classifier.task: segmentation models are tested by strategy {' or '.join(able)} "
                             f"(it keeps each source's layout, so the source's mask stays its ground truth), "
                             f"not {self.strategy.name!r}")
        if spec.uri is None and spec.architecture is None:
            default = MODEL_KINDS.get("segmenter").default
            self.classifier = spec.model_copy(update={"architecture": default["architecture"],
                                                      "train": spec.train or default["train"]})
        elif spec.architecture is not None and model_kind(spec.architecture) != "segmenter":
            raise ValueError(f"classifier.architecture: {spec.architecture!r} is a {model_kind(spec.architecture)}; "
                             f"a segmentation model under test needs a segmenter ({', '.join(list_models('segmenter'))})")


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        field, sep, rest = msg.partition(": ")
        if sep and field.isidentifier() and field in ("options",):  # a validator that names the sub-field
            where, msg = f"{where}.{field}", rest
        lines.append(f"{where}: {msg}")
    return "invalid campaign config:\n  " + "\n  ".join(lines)


def load_config(source: str | Path | dict | CampaignConfig, **overrides: Any) -> CampaignConfig:
    """Validate a config from a YAML path, a dict or a ``CampaignConfig``; ``overrides`` replace
    top-level fields (``output=``, ``run_id=``) when not None.

    Raises:
        ConfigError: naming every invalid field and, where there is a list, the allowed values.
    """
    if isinstance(source, CampaignConfig):
        raw = source.model_dump()
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        try:
            raw = read_yaml(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of fields, got {type(raw).__name__}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return CampaignConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
