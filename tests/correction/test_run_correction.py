"""Correction of a real tiny run end to end, and the bad inputs that must leave the run untouched."""

import json

import io

import pytest
from PIL import Image

from genstress_ray.cli import main
from genstress_ray.config import ConfigError
from genstress_ray.correction import run_correction
from genstress_ray.labeling import LabelError, labels_table, write_labels
from genstress_ray.models import ModelError, get_model, save_checkpoint
from genstress_ray.pipeline import run_campaign
from genstress_ray.storage import RunStore

from browser import CHROMIUM

pytestmark = pytest.mark.usefixtures("ray_cluster")
CLASSES = [str(i) for i in range(10)]


def _snapshot(store: RunStore) -> dict:
    """Every file of the run with its bytes: what 'untouched' means."""
    return {p: store.fs.cat_file(p) for p in store.fs.find(store.path)}


def test_correction_writes_trials_selection_checkpoints_and_results(labelled_run, capsys, request):
    store = labelled_run
    assert main(["correct", store.uri]) == 0
    out = capsys.readouterr().out
    assert "1 failure regions of" in out and "defuse" in out and "baseline" in out
    sets = store.read_table("region_sets")
    assert set(sets["region_id"].to_pylist()) == {0}  # only the failure region
    assert sets.num_rows == 30 and set(sets["source_label"].to_pylist()) == {3}
    trials = store.read_table("correction").to_pylist()
    assert sorted((t["method"], t["lam"]) for t in trials) == [("baseline", 1e-10), ("baseline", 10.0),
                                                                ("defuse", 1e-10), ("defuse", 10.0)]
    assert sum(t["selected"] for t in trials) == 2
    results = json.loads(store.fs.cat_file(f"{store.path}/correction/results.json"))
    assert results["n_failure_regions"] == 1 and results["n_labelled_regions"] == 2
    for method in ("defuse", "baseline"):
        chosen = [t for t in trials if t["method"] == method and t["selected"]][0]
        assert results[method]["lam"] == chosen["lam"]
        assert store.fs.exists(results[method]["checkpoint"])
    assert not store.fs.exists(f"{store.path}/correction/trials")  # only the selected weights are kept
    assert store.read_manifest()["correction"]["n_failure_regions"] == 1
    # Region accuracy per failure region, before and with each method's chosen model.
    [(rid, acc)] = results["per_region"].items()
    assert acc["n"] > 0 and set(acc) == {"n", "before", "defuse", "baseline"}
    assert acc["defuse"] == pytest.approx(results["defuse"]["region_test_acc"])
    # The report now has the before/after table and the trade-off plot.
    assert main(["report", store.uri]) == 0
    html = store.fs.cat_file(f"{store.path}/report/index.html").decode()
    assert "id='before-after'" in html and "alt='lambda trade-off'" in html
    assert "<th>after defuse</th>" in html and f"<a href='#region-{rid}'>" in html
    # Relabelling changes the failure regions: the region sets are drawn again for the new ones.
    write_labels(store, labels_table([{"region_id": 0, "label": "3", "is_failure": True, "source": "human"},
                                      {"region_id": 1, "label": "8", "is_failure": True, "source": "human"}]),
                 CLASSES)
    again = run_correction(store.uri, {"lambdas": [1.0], "baseline": False, "workers": 0})
    assert again.results["n_failure_regions"] == 2 and "baseline" not in again.results
    sets = store.read_table("region_sets")
    assert {r: l for r, l in zip(sets["region_id"].to_pylist(), sets["source_label"].to_pylist())} == {0: 3, 1: 8}
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian package 'chromium'): the report was not opened in a browser")
    _check_in_browser(request.getfixturevalue("page"), f"{store.path}/report/index.html")


def _check_in_browser(page, path):
    """The report opens offline with no console errors, and every image renders at a non-zero size."""
    page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(("file:", "data:"))
               else route.continue_())
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto(f"file://{path}")
    page.wait_for_load_state("load")
    assert page.console_errors == []
    # The first screen shows the failure-region table, whole.
    shot = page.screenshot()
    assert Image.open(io.BytesIO(shot)).size == (1280, 800)
    box = page.locator("#failure-regions").bounding_box()
    assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= 800
    sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert len(sizes) >= 4
    assert all(done and w > 0 and h > 0 for done, w, h in sizes)
    assert page.locator("#before-after tr").count() == 4  # header, before, baseline, defuse


def test_an_empty_lambda_list_is_refused_before_anything_is_written(labelled_run, capsys):
    before = _snapshot(labelled_run)
    with pytest.raises(ConfigError, match="correction.lambdas: .*lambda list is empty"):
        run_correction(labelled_run.uri, {"lambdas": []})
    assert main(["correct", labelled_run.uri, "--lambdas"]) == 2
    assert "lambda list is empty" in capsys.readouterr().err
    assert _snapshot(labelled_run) == before


def test_a_classifier_checkpoint_that_does_not_match_is_named_and_nothing_changes(labelled_run, tiny_config):
    store = labelled_run
    uri = tiny_config["classifier"]["uri"]
    with open(uri, "rb") as f:
        good = f.read()
    # The file the run points at now holds a different architecture's weights.
    save_checkpoint(get_model("small_cnn", in_shape=[1, 8, 8], num_classes=10, width=6, hidden=16), uri,
                    "small_cnn", {"in_shape": [1, 8, 8], "num_classes": 10, "width": 4, "hidden": 16})
    before = _snapshot(store)
    try:
        with pytest.raises(ModelError, match="does not match architecture"):
            run_correction(store.uri)
    finally:
        with open(uri, "wb") as f:
            f.write(good)
    assert _snapshot(store) == before


def test_correction_without_labels_is_refused(tiny_config):
    result = run_campaign(tiny_config)
    with pytest.raises(LabelError, match="no labels yet"):
        run_correction(result.run_uri)


def _members_run(tiny_config, split: str):
    """The tiny campaign with centred noise (regions around real images' latents), run, with the
    region holding the most real members of ``split`` (quantile 0.99) labelled a failure of class 3;
    returns the store, that region and the split's membership."""
    import numpy as np
    import pyarrow.compute as pc
    import torch

    from genstress_ray.context import RunContext, load_split
    from genstress_ray.data import to_float
    from genstress_ray.models import ModelRef, load_generator
    from genstress_ray.regions import assign_real

    tiny_config["strategy"]["centred"] = True
    tiny_config["correction"] = {"finetune_per_region": 20, "test_per_region": 10, "epochs": 1, "batch_size": 32}
    store = RunStore.from_uri(run_campaign(tiny_config).run_uri)
    ctx = RunContext.open(store.uri)
    images = load_split(ctx.cfg.test_spec() if split == "test" else ctx.cfg.data.validation_spec())
    generator = load_generator(ModelRef(store.read_manifest()["models"]["generator"]), (1, 8, 8))
    with torch.no_grad():
        latents = generator.encode(to_float(images.images))[0].numpy()
    faults = store.read_table("identify", columns=["latent"], filter=pc.field("fault"))
    membership = assign_real(store.read_table("regions"), np.stack(faults["latent"].to_numpy(zero_copy_only=False)),
                             latents, 0.99)
    rid = max(membership.members, key=membership.members.get)
    assert membership.members[rid] > 0, "centred noise: real images lie inside the regions"
    write_labels(store, labels_table([{"region_id": rid, "label": "3", "is_failure": True, "source": "human"}]),
                 CLASSES)
    return store, rid, images, membership.region == rid


def test_real_members_are_scored_against_their_own_labels_recomputed_from_the_runs_own_tables(tiny_config,
                                                                                              ray_cluster):
    """The real-image verdict, recomputed here: the held-out test split (the half of the digits' test
    split the search did not take) encoded with the run's generator, assigned to regions by radius,
    each model scored against each image's own label, split into the region's subgroup (label 3, the
    region's) and its collateral (other labels)."""
    import torch

    from genstress_ray.correction.real import MIN_REAL_MEMBERS
    from genstress_ray.data import to_float
    from genstress_ray.models import ModelRef, load_classifier, load_module

    store, rid, test, inside = _members_run(tiny_config, "test")
    results = run_correction(store.uri, {"baseline": False, "workers": 0, "member_quantile": 0.99}).results
    real = results["real_members"]
    searched = set(store.read_table("identify", columns=["source_id"])["source_id"].to_pylist())
    assert searched and not searched & set(test.source_ids), "the verdict's images were never searched"
    subgroup, collateral = inside & (test.labels == 3), inside & (test.labels != 3)
    assert real["test_images"] == len(test) and "quantile" in real["criterion"]
    region = real["per_region"][str(rid)]
    assert region["label"] == "3" and region["all"]["n"] == int(inside.sum()) == real["overall"]["all"]["n"]
    assert region["subgroup"]["n"] == int(subgroup.sum()) and region["collateral"]["n"] == int(collateral.sum())
    manifest = store.read_manifest()
    models = {"before": load_classifier(ModelRef(manifest["models"]["classifier"]), CLASSES, (1, 8, 8)).net,
              "defuse": load_module(results["defuse"]["checkpoint"])[0]}
    for name, model in models.items():
        with torch.no_grad():
            pred = model.eval()(to_float(test.images)).argmax(1).numpy()
        right = pred == test.labels  # each image against its own label, never the region's
        for group, mask in (("all", inside), ("subgroup", subgroup), ("collateral", collateral)):
            if mask.sum() >= MIN_REAL_MEMBERS:
                assert region[group][name] == pytest.approx(float(right[mask].mean()))
            else:
                assert "too few real members" in region[group]["message"]
    if inside.sum() >= MIN_REAL_MEMBERS:
        # Every trial scored the same real members of the test split; the chosen one's figure is the same.
        assert results["defuse"]["real_members_test_acc"] == pytest.approx(real["overall"]["all"]["defuse"])


def test_lambda_chosen_by_the_real_validation_members_own_labels(tiny_config, ray_cluster):
    """select_by real_region: every trial carries its real-member figures (own labels) and the chosen
    lambda is the one they rank first; the region-label option is gone."""
    from genstress_ray.correction.finetune import selection_score

    store, _, _, _ = _members_run(tiny_config, "validation")
    results = run_correction(store.uri, {"baseline": False, "workers": 0, "lambdas": [1e-10, 100.0],
                                         "member_quantile": 0.99, "select_by": "real_region"}).results
    assert results["real_members"]["quantile"] == 0.99
    trials = store.read_table("correction").to_pylist()
    assert all(0 <= t["real_members_val_acc"] <= 1 for t in trials)
    best = max(trials, key=lambda t: selection_score(t, "real_region"))
    assert [t["lam"] for t in trials if t["selected"]] == [best["lam"]] == [results["defuse"]["lam"]]
    with pytest.raises(ConfigError, match="real_region_label"):
        run_correction(store.uri, {"real_region_label": "oracle"})


def test_flagged_labels_are_left_out_of_the_correction_unless_confirmed(labelled_run, capsys):
    """A label given to more than half of the failure regions is flagged; correction leaves those
    regions out until the user confirms them."""
    store = labelled_run
    regions = store.read_table("regions")["region_id"].to_pylist()
    assert len(regions) >= 3
    write_labels(store, labels_table([{"region_id": r, "label": "3", "is_failure": True, "source": "human"}
                                      for r in regions[:3]]), CLASSES)
    flagged = store.marker("labels")["flagged"]
    assert sorted(flagged) == ["0", "1", "2"] and all("given to 3 of the 3 failure regions" in w for w in flagged.values())
    assert all(r["flag"] for r in store.read_table("labels").to_pylist())
    with pytest.raises(LabelError, match="every failure region's label is flagged .* --confirm-flagged 0 1 2"):
        run_correction(store.uri, {"baseline": False, "workers": 0, "lambdas": [1.0]})
    assert main(["correct", store.uri, "--no-baseline", "--workers", "0", "--lambdas", "1", "--confirm-flagged", "0"]) == 0
    out = capsys.readouterr().out
    assert "1 failure regions of" in out and "left out" in out and "region 1:" in out and "region 2:" in out
    results = json.loads(store.fs.cat_file(f"{store.path}/correction/results.json"))
    assert results["failure_regions"] == [0] and sorted(results["left_out"]) == ["1", "2"]
    with pytest.raises(LabelError, match=r"confirm_flagged: region\(s\) \[7\] are not flagged"):
        run_correction(store.uri, {"confirm_flagged": [7]})


@pytest.mark.slow
def test_ctrl_c_during_the_lambda_sweep_is_one_line_not_a_traceback(labelled_run):
    """Tune takes SIGINT itself and hands back the trials it stopped; that is an interrupt, not a crash."""
    import os
    import signal
    import subprocess
    import sys
    import time

    store = labelled_run
    proc = subprocess.Popen([sys.executable, "-m", "genstress_ray.cli", "correct", store.uri, "--epochs", "400",
                             "--no-baseline"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not store.is_complete("region_sets"):
        time.sleep(0.5)
    time.sleep(8)  # the trials are running
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyError" not in err, err[-3000:]
    assert "interrupted" in err
    assert not store.is_complete("correction")
