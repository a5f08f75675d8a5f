"""What a verdict may rest on: search and evaluation never share an image, a search that cannot mean
anything is refused, and the defaults are the settings that work (README, "Held-out images" and
"Guardrails")."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from genstress_ray.cli import DEMO_CONFIG, main
from genstress_ray.config import PAPER_LAMBDAS, SHORT_LAMBDAS, load_config
from genstress_ray.context import check_disjoint
from genstress_ray.data import DataError, get_source
from genstress_ray.models import ModelError
from genstress_ray.pipeline import run_campaign
from genstress_ray.strategies import DefuseParams

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]


def test_two_shares_of_a_split_are_disjoint_and_cover_it():
    whole = get_source("digits", split="test").load()
    first = get_source("digits", split="test", share=(0.0, 0.5)).load()
    second = get_source("digits", split="test", share=(0.5, 1.0)).load()
    assert not set(first.source_ids) & set(second.source_ids)
    assert sorted(first.source_ids + second.source_ids) == sorted(whole.source_ids)
    assert 150 < len(first) < 210
    # A limit takes the first rows of the share, so it never reaches into the other share.
    assert set(get_source("digits", split="test", share=(0.0, 0.5), limit=20).load().source_ids) <= set(first.source_ids)
    with pytest.raises(DataError, match="data.share"):
        get_source("digits", share=(0.6, 0.2))


def test_row_identity_sees_through_split_names_but_not_across_file_sets():
    # One pool: the digits' splits never share a row, and a share of a split is part of the split.
    test, train = get_source("digits", split="test"), get_source("digits", split="train")
    assert not test.origin_ids() & train.origin_ids()
    assert get_source("digits", split="test", share=(0, 0.5)).origin_ids() <= test.origin_ids()
    if (SHARED_DATA / "mnist").exists():
        # A validation split carved out of MNIST's test files (split_from) holds test-file rows, under
        # another split name: the same images as the test split's.
        uri = str(SHARED_DATA / "mnist")
        test_files = get_source("mnist", uri=uri, split="test").origin_ids()
        carved = get_source("mnist", uri=uri, split="validation", split_from="test").origin_ids()
        assert len(carved) == 1000 and carved <= test_files
        # The training files are another pool: row 5 of each is another image.
        train = get_source("mnist", uri=str(SHARED_DATA / "mnist_train_first20k"), split="train", limit=50)
        assert not train.origin_ids() & test_files


def test_a_campaign_whose_test_or_validation_images_were_searched_is_refused_before_any_work(tiny_config, tmp_path):
    cfg = copy.deepcopy(tiny_config)
    cfg["data"]["search"] = {"kind": "digits", "split": "test", "limit": 48}  # the whole test split: nothing left
    with pytest.raises(DataError, match=r"data.search and the default test split .* share 48 of the search's 48 "
                                        r"images.* Fix: give data.search a share of its split"):
        run_campaign(cfg)
    cfg["data"]["search"] = {"kind": "digits", "split": "test", "share": [0.0, 0.5]}
    cfg["correction"] = {"test": {"kind": "digits", "split": "test"}}
    with pytest.raises(DataError, match=r"data.search and correction.test share \d+ of the search's \d+ images"):
        run_campaign(cfg)
    cfg["correction"] = {}
    cfg["data"]["search"] = {"kind": "digits", "split": "validation"}
    with pytest.raises(DataError, match="data.search and data.validation share 180 of the search's 180 images"):
        run_campaign(cfg)
    assert not (tmp_path / "runs").exists(), "refused before anything was written"
    # The CLI names it and exits 2.
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**cfg, "data": {"search": {"kind": "digits", "split": "test"}}}))
    assert main(["run", str(path)]) == 2


def test_the_default_test_split_is_the_rest_of_a_searched_split():
    cfg = load_config({"campaign": "c"})
    assert cfg.data.search.share == (0.0, 0.5) and cfg.test_spec().share == (0.5, 1.0)
    sizes = check_disjoint(cfg)
    assert sizes["search"] + sizes["correction.test"] == len(get_source("digits", split="test").load())
    train = load_config({"campaign": "c", "data": {"search": {"kind": "digits", "split": "train"}}})
    assert train.test_spec().split == "test" and train.test_spec().share is None
    # Splits made from the search for training keep none of its share.
    assert cfg.data.train_spec().share is None and cfg.data.validation_spec().share is None


def _job_configs():
    for path in sorted((ROOT / "jobs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if "campaign" in raw:
            yield path.name, raw
    yield "genstress demo", DEMO_CONFIG


@pytest.mark.parametrize("name, raw", list(_job_configs()), ids=lambda v: v if isinstance(v, str) else "")
def test_the_demo_and_every_job_file_cut_disjoint_splits(name, raw, monkeypatch):
    monkeypatch.chdir(ROOT)  # job files give data paths relative to the repository root
    cfg = load_config(raw)
    readable = not any(str(s.uri or "").startswith("s3://") for s in (cfg.data.search, cfg.test_spec()))
    if cfg.strategy.plugin.source_rows is not None:
        return  # a search from seeds or noise uses no data image
    if readable and (cfg.data.search.kind == "digits" or (SHARED_DATA / "mnist").exists()):
        sizes = check_disjoint(cfg)
        assert sizes["search"] > 0 and sizes["correction.test"] > 0
    else:  # on object storage here: the specs themselves must keep the search off the test split
        search, test = cfg.data.search, cfg.test_spec()
        assert (search.uri, search.split) != (test.uri, test.split) or (
            search.share and test.share and (search.share[1] <= test.share[0] or test.share[1] <= search.share[0]))


def test_defuse_defaults_are_the_settings_that_work_and_the_reference_is_a_preset():
    p = DefuseParams()
    assert p.centred and p.only_correct_reconstructions and p.a == p.b == 40
    reference = DefuseParams(preset="reference")
    assert (reference.a, reference.b, reference.centred, reference.only_correct_reconstructions) == (0.75, 0.75, False,
                                                                                                     False)
    assert DefuseParams(preset="reference", a=2.0).a == 2.0  # what the config sets wins
    assert len(PAPER_LAMBDAS) == 17 and len(SHORT_LAMBDAS) == 9 and set(SHORT_LAMBDAS) <= set(PAPER_LAMBDAS)
    assert load_config({"campaign": "c"}).correction.lambdas == SHORT_LAMBDAS


def test_a_generator_whose_reconstructions_the_classifier_cannot_read_is_refused(tiny_config, planted_classifier,
                                                                                 tmp_path, capsys):
    """A trained classifier and a random VAE: its reconstructions are noise, so faults would be the
    generator's. Refused before the search with the figure and what to do; accepted with the flag."""
    cfg = copy.deepcopy(tiny_config)
    cfg["classifier"] = {"uri": planted_classifier}
    cfg.pop("checks")
    with pytest.raises(ModelError, match=r"generator fidelity \d+\.\d%: .* below checks.min_fidelity 80%.* Train the "
                                         r"generator longer .* --accept-low-fidelity"):
        run_campaign(cfg)
    assert not (tmp_path / "runs" / "test" / "r1" / "identify").exists()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**cfg, "reduce": {**cfg["reduce"], "samples_per_region": 0}}))
    assert main(["run", str(path), "--until", "identify"]) == 2
    assert "generator fidelity" in capsys.readouterr().err
    assert main(["run", str(path), "--until", "identify", "--accept-low-fidelity"]) == 0
    out = capsys.readouterr().out
    figure = re.search(r"generator fidelity: (\d+\.\d)% of (\d+) search images' reconstructions classified right "
                       r"\(threshold 80%\) \(below the threshold, accepted", out)
    assert figure and int(figure.group(2)) == 48
    # The figure is the classifier's accuracy on the VAE's reconstructions, recomputed here.
    import torch

    from genstress_ray.context import load_split
    from genstress_ray.data import to_float
    from genstress_ray.models import ModelRef, load_generator, load_module

    search = load_split(load_config(cfg).data.search)
    vae = load_generator(ModelRef(cfg["generator"]["uri"]), (1, 8, 8))
    with torch.no_grad():
        recon = vae.decode(vae.encode(to_float(search.images))[0])
        right = (load_module(planted_classifier)[0].eval()(recon).argmax(1).numpy() == search.labels).mean()
    assert float(figure.group(1)) == pytest.approx(100 * right, abs=0.06)


def test_a_label_its_region_does_not_support_is_flagged_in_the_table_the_output_and_the_report(tiny_config, tmp_path,
                                                                                               capsys, ray_cluster):
    import json

    from genstress_ray.labeling.support import region_classes
    from genstress_ray.storage import RunStore

    result = run_campaign(tiny_config)
    store = RunStore.from_uri(result.run_uri)
    classes = region_classes(store)
    regions = {r["region_id"]: r for r in store.read_table("regions").to_pylist()}
    rid = min(classes, key=lambda r: len(classes[r]))  # the region whose faults touch the fewest classes
    region = regions[rid]
    assert len(classes[rid]) < 10
    absent = next(str(c) for c in range(10) if c not in classes[rid])
    assert all(int(absent) not in pair[:2] for pair in json.loads(region["top_pairs"]))
    path = tmp_path / "labels.csv"
    path.write_text(f"region_id,label\n{region['region_id']},{absent}\n")
    assert main(["label", store.uri, "--file", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"FLAGGED region {region['region_id']}: label '{absent}' is neither a source class nor a predicted class" in out
    assert f"--confirm-flagged {region['region_id']}" in out
    [row] = [r for r in store.read_table("labels").to_pylist() if r["region_id"] == region["region_id"]]
    assert row["flag"] and row["is_failure"]
    assert main(["report", store.uri]) == 0
    page = store.fs.cat_file(f"{store.path}/report/index.html").decode()
    assert "flagged: label" in page
    assert np.isfinite(store.read_manifest()["fidelity"]["accuracy"])
