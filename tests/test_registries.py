"""One contract per registry, run over everything registered (in the manner of scikit-learn's
``parametrize_with_checks``): a new strategy, source, model kind or labeller is checked here as soon
as it is registered, and each needs only its tiny inputs added below (a test says when one is missing).
"""

from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import SHARED_DATA, TINY_CNN, TINY_DDPM, TINY_STYLEGAN, TINY_VAE
from genstress_ray.config import ConfigError, load_config
from genstress_ray.counterfactuals.control import CONTROLS, MASK_CONTROLS
from genstress_ray.data import SOURCES, get_source
from genstress_ray.labeling import LABELLERS, export_tasks, validate_labels
from genstress_ray.repair import DECIDERS
from genstress_ray.models import MODEL_KINDS, ModelRef, load_classifier, load_generator, model_kind, train_and_save
from genstress_ray.registry import resolve
from genstress_ray.storage import SAMPLES_SCHEMA, RunStore
from genstress_ray.strategies import STRATEGIES

NAMES = [str(i) for i in range(10)]
REGISTRIES = {"strategy": STRATEGIES, "dataset kind": SOURCES, "model kind": MODEL_KINDS, "labelling method": LABELLERS,
              "relabelling method": DECIDERS}


@pytest.mark.parametrize("what", REGISTRIES)
def test_a_registry_refuses_a_second_registration_and_lists_what_it_holds(what):
    registry = REGISTRIES[what]
    first = registry.names()[0]
    with pytest.raises(ValueError, match=f"{what} '{first}' is already registered .registered: {first}, "):
        registry.register(first, registry.get(first))
    with pytest.raises(Exception, match=f"unknown {what} 'no_such_name'; allowed: {first}, "):
        registry.get("no_such_name")
    assert registry.names() == list(registry) and len(registry.values()) == len(registry.names())

# ---- strategies ------------------------------------------------------------------------------
# Tiny parameters for every registered strategy, on the tiny model of its generator kind.
TINY_STRATEGY = {
    "defuse": {"a": 1.0, "b": 1.0, "draws": 6, "keep": "all"},
    "truncation": {"seeds": 12, "budget_calls": 6, "keep": "all"},
    "mixing": {"seeds": 10, "budget_calls": 20, "tolerance": 0.05, "keep": "all"},
    "kldb": {"classes": ["4", "9"], "seeds": 5, "alphas": [0.0, 0.2], "betas": [1.0], "steps": 4,
             "guidance_every": 2, "scheduler": "ddim"},
    "counterfactual": {"controlnet": "tiny-controlnet", "per_caption": 2, "steps": 2, "keep": "all"},
}
GENERATOR_OF_KIND = {"latent_generator": "generator", "style_generator": "style_generator",
                     "diffusion_model": "diffusion_model"}


def test_every_strategy_has_tiny_test_parameters():
    assert set(STRATEGIES) == set(TINY_STRATEGY), "add the new strategy's tiny parameters to TINY_STRATEGY"


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_a_strategy_declares_every_part_and_each_resolves(name):
    strategy = STRATEGIES.get(name)
    assert strategy.params.model_fields["name"].default == name
    assert strategy.generator_kind in MODEL_KINDS
    for part in (strategy.stage, strategy.assess, strategy.report):
        assert callable(resolve(part)), part
    cfg = load_config({"strategy": {"name": name, **TINY_STRATEGY[name]}})
    assert cfg.strategy.plugin is strategy and model_kind(cfg.generator.architecture) == strategy.generator_kind


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_a_bad_strategy_parameter_is_named_in_the_error(name):
    with pytest.raises(ConfigError, match=f"strategy.{name}.no_such_parameter"):
        load_config({"strategy": {"name": name, **TINY_STRATEGY[name], "no_such_parameter": 1}})
    numeric = next(k for k, v in TINY_STRATEGY[name].items() if isinstance(v, int) and not isinstance(v, bool))
    with pytest.raises(ConfigError, match=f"strategy.{name}.{numeric}"):
        load_config({"strategy": {"name": name, **TINY_STRATEGY[name], numeric: "many"}})


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("name", STRATEGIES.names())
def test_a_strategy_writes_the_samples_schema_with_unique_ids_and_the_same_rows_however_it_is_run(
        name, tiny_config, tiny_models, tiny_controlnet, style_classifier, planted_classifier, tmp_path):
    from genstress_ray.pipeline import run_campaign

    strategy = STRATEGIES.get(name)
    base = copy.deepcopy(tiny_config)
    base["generator"] = {"uri": tiny_models[GENERATOR_OF_KIND[strategy.generator_kind]]}
    if strategy.generator_kind == "style_generator":
        base["classifier"] = {"uri": style_classifier}
    base["strategy"] = {"name": name, **TINY_STRATEGY[name]}
    if name == "counterfactual":  # Stable Diffusion and its ControlNet are folders, made once per session
        base["classifier"] = {"uri": planted_classifier}  # it skips sources the classifier gets wrong
        base["generator"] = {"uri": tiny_controlnet["stable_diffusion"]}
        base["strategy"]["controlnet"] = tiny_controlnet["controlnet"]
        base["data"]["search"]["limit"] = 12
    tables = []
    for actors, batch_size in ((1, 8), (2, 8), (1, 5)):  # at least two batches for two actors
        cfg = copy.deepcopy(base)
        cfg.update(run_id=f"a{actors}-b{batch_size}")
        cfg["resources"]["search"].update(actors=actors, batch_size=batch_size)
        result = run_campaign(cfg, stop_after="identify")
        tables.append(RunStore(cfg["output"], cfg["campaign"], result.run_id).read_table("identify"))
    first = tables[0]
    assert first.schema.equals(SAMPLES_SCHEMA) and first.num_rows > 0
    ids = first["sample_id"].to_pylist()
    assert len(set(ids)) == len(ids) and set(first["strategy"].to_pylist()) == {name}
    for other in tables[1:]:
        assert other["sample_id"].to_pylist() == ids
        for column in ("pred", "fault", "params", "source_label"):
            assert other[column].to_pylist() == first[column].to_pylist(), column
        np.testing.assert_allclose(np.stack(other["latent"].to_numpy(zero_copy_only=False)),
                                   np.stack(first["latent"].to_numpy(zero_copy_only=False)), atol=1e-4)


# ---- data sources ----------------------------------------------------------------------------
def _png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _image_folder(tmp_path) -> dict:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir(parents=True)
        for i in range(10):
            (tmp_path / cls / f"{i}.png").write_bytes(_png(rng.integers(0, 255, (8, 8), dtype=np.uint8)))
    return {"uri": str(tmp_path)}


def _imagenet(tmp_path) -> dict:
    """Synset folders of differently sized RGB JPEGs and their mapping file (one class has no folder)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(2)
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n"
                                                     "n01484850 great white shark\n")
    for synset in ("n01440764", "n01484850"):
        (tmp_path / synset).mkdir()
        for i in range(10):
            buf = io.BytesIO()
            size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG")
            (tmp_path / synset / f"{synset}_{i}.JPEG").write_bytes(buf.getvalue())
    return {"uri": str(tmp_path), "resize": 16}


def _parquet(tmp_path) -> dict:
    rng = np.random.default_rng(1)
    images = [_png(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in range(20)]
    pq.write_table(pa.table({"image": images, "label": ["a", "b"] * 10}), tmp_path / "d.parquet")
    return {"uri": str(tmp_path / "d.parquet")}


def _shared(folder: str, split_from: str):
    """A file set of ../shared/data, all three splits carved out of its ``split_from`` files."""
    def options(tmp_path) -> dict:
        if not (SHARED_DATA / folder).exists():
            pytest.skip(f"{SHARED_DATA / folder} not found")
        return {"uri": str(SHARED_DATA / folder), "split_from": split_from, "limit": 300}
    return options


# Where each registered source finds tiny data.
SOURCE_OPTIONS = {"digits": lambda tmp_path: {}, "mnist": _shared("mnist_train_first20k", "train"),
                  "fashion_mnist": _shared("fashion_mnist", "test"), "image_folder": _image_folder,
                  "imagenet": _imagenet, "parquet": _parquet, "scenes": lambda tmp_path: {"size": 60}}


def test_every_source_has_tiny_test_data():
    assert set(SOURCES) == set(SOURCE_OPTIONS), "add the new source's tiny data to SOURCE_OPTIONS"


@pytest.mark.parametrize("kind", SOURCES.names())
def test_a_source_gives_reproducible_disjoint_splits_with_stable_ids(kind, tmp_path):
    options = SOURCE_OPTIONS[kind](tmp_path)
    splits = {s: get_source(kind, split=s, **options).load() for s in ("train", "validation", "test")}
    for split, images in splits.items():
        assert len(images) > 0 and len(set(images.source_ids)) == len(images), split
        assert images.images.dtype == np.uint8 and images.images.ndim == 4
        assert set(images.labels.tolist()) <= set(range(len(images.class_names)))
    ids = [set(s.source_ids) for s in splits.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    again = get_source(kind, split="test", **options).load()
    assert again.source_ids == splits["test"].source_ids and np.array_equal(again.images, splits["test"].images)


@pytest.mark.parametrize("kind", SOURCES.names())
def test_a_sources_shards_read_back_to_its_split(kind, tmp_path):
    """What the search streams (shards read one by one, as Ray tasks do) is what ``load`` gives."""
    import pickle

    options = SOURCE_OPTIONS[kind](tmp_path)
    source = get_source(kind, split="train", **options)
    catalog, shards = source.catalog(), source.shards(7)
    reader = pickle.loads(pickle.dumps(source))  # what a read task gets
    tables = [reader.read_shard(shard)[0] for shard in shards]
    assert [t.num_rows for t in tables] == [s.size for s in shards] and all(s.size <= 7 for s in shards)
    data = get_source(kind, split="train", **options).load()
    assert catalog.rows == len(data) and catalog.class_names == data.class_names
    assert tuple(catalog.image_shape) == data.image_shape
    rows = pa.concat_tables(tables)
    assert rows["source_id"].to_pylist() == data.source_ids and rows["source_label"].to_pylist() == data.labels.tolist()
    pixels = np.frombuffer(b"".join(rows["image"].to_pylist()), np.uint8).reshape(data.images.shape)
    assert np.array_equal(pixels, data.images)
    assert ("mask" in rows.column_names) == (data.masks is not None)
    if data.masks is not None:  # a segmentation data set's masks travel with their rows
        masks = np.frombuffer(b"".join(rows["mask"].to_pylist()), np.uint8).reshape(data.masks.shape)
        assert np.array_equal(masks, data.masks)


# ---- model kinds -----------------------------------------------------------------------------
TINY_PARAMS = {"small_cnn": TINY_CNN, "beta_vae": TINY_VAE, "small_stylegan": TINY_STYLEGAN, "small_ddpm": TINY_DDPM,
               "small_segnet": {"width": 4}}
# The models under test, with the task each is loaded for and data it trains on (a segmenter needs masks).
UNDER_TEST = {"classifier": ("classification", "digits", {}),
              "segmenter": ("segmentation", "scenes", {"size": 40, "side": 16})}


def test_model_kind_commands_are_unique_and_defaults_are_their_kinds():
    kinds = MODEL_KINDS.values()
    assert len({k.command for k in kinds}) == len(kinds)
    for kind in kinds:
        assert model_kind(kind.default["architecture"]) == kind.name


@pytest.mark.parametrize("kind", MODEL_KINDS.names())
def test_a_model_kinds_trainer_makes_a_checkpoint_that_loads_behind_its_protocol(kind, tmp_path):
    spec = MODEL_KINDS.get(kind)
    architecture = spec.default["architecture"]
    task, source, options = UNDER_TEST.get(kind, (None, "digits", {}))
    train = get_source(source, split="train", limit=64, **options).load()
    uri = str(tmp_path / "model.safetensors")
    params = {k: v for k, v in TINY_PARAMS[architecture].items() if k != "in_shape"}
    train_and_save(kind, architecture, train, None, uri, params, {"epochs": 1})
    x = torch.from_numpy(train.images[:4]).float() / 255
    with torch.no_grad():
        if task is not None:
            model = load_classifier(ModelRef(uri, task=task), train.class_names, train.image_shape)
            per_pixel = train.image_shape[1:] if task == "segmentation" else ()
            assert model(x).shape == (4, len(train.class_names), *per_pixel)
            return
        generator = load_generator(ModelRef(uri), (1, 8, 8), kind, 10)
        images = generator.decode(_latents(generator, kind, 4))
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    with pytest.raises(Exception, match="unknown model kind 'no_such_kind'"):
        load_generator(ModelRef(uri), (1, 8, 8), "no_such_kind", 10)


def _latents(generator, kind: str, n: int) -> torch.Tensor:
    """Latents the protocol decodes: what the kind's strategies store in the ``latent`` column."""
    if kind == "latent_generator":
        return torch.zeros(n, generator.latent_dim)
    if kind == "style_generator":
        ws = generator.mapping(torch.zeros(n, generator.z_dim), generator.one_hot(torch.zeros(n, dtype=torch.long)))
        return ws.flatten(1)
    return torch.zeros(n, int(np.prod(generator.latent_shape)))


# ---- labellers -------------------------------------------------------------------------------
def _label_file(store, tmp_path, tiny_models) -> str:
    path = tmp_path / "labels.csv"
    ids = store.read_table("regions")["region_id"].to_pylist()
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["region_id", "label"])
        writer.writerows([rid, NAMES[rid % 10]] for rid in ids)
    return str(path)


def _label_studio_export(store, tmp_path, tiny_models) -> str:
    tasks = export_tasks(store.read_table("region_samples"), NAMES, store.uri, per_region=2)
    for task in tasks:
        task["annotations"] = [{"completed_by": 1, "result": [{"from_name": "label", "to_name": "image",
                                                               "type": "choices", "value": {"choices": ["3"]}}]}]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    return str(path)


# What each registered labeller is given on the command line.
LABELLER_VALUE = {"oracle": lambda store, tmp_path, models: models["classifier"], "file": _label_file,
                  "import_label_studio": _label_studio_export}


def test_every_labeller_has_a_test_input():
    assert set(LABELLERS) == set(LABELLER_VALUE), "add the new labeller's input to LABELLER_VALUE"


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("name", LABELLERS.names())
def test_a_labeller_makes_a_valid_labels_table_for_the_run(name, tiny_config, tiny_models, tmp_path):
    from genstress_ray.pipeline import run_campaign

    result = run_campaign(tiny_config)
    store = RunStore.from_uri(result.run_uri)
    assert result.regions, "the tiny run should have regions to label"
    value = LABELLER_VALUE[name](store, tmp_path, tiny_models)
    table = LABELLERS.get(name).label(store, value, {"rho": 0.5, "per_region": 4, "fault_labels": 10})
    validate_labels(table, [r["region_id"] for r in result.regions], NAMES)
    labelled = {r for r in table["region_id"].to_pylist() if r is not None}
    assert labelled == {r["region_id"] for r in result.regions}


# ---- control images --------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONTROLS.names()))
def test_a_control_keeps_the_layout_as_a_three_channel_image_of_the_sources_size(name):
    scenes = get_source("scenes", split="test", limit=3, size=40, side=16).load()
    control = CONTROLS.get(name)
    out = control(scenes.images, scenes.masks)
    assert out.shape == (3, 3, 16, 16) and out.dtype == np.uint8
    # Sources with another layout (the object moved) get another control image.
    moved = control(np.roll(scenes.images, 5, axis=3), np.roll(scenes.masks, 5, axis=2))
    assert not np.array_equal(out, moved)
    if name in MASK_CONTROLS:
        with pytest.raises(ValueError, match=f"control '{name}' .* none"):
            control(scenes.images, None)
        # Its colours tell the masks' classes apart, one colour per class.
        colours = {tuple(out[i, :, y, x]) for i in range(3) for y in range(16) for x in range(16)}
        assert len(colours) == len(np.unique(scenes.masks))
