"""Data repair on a real tiny run: `genstress repair` proposals, decisions four ways (file, Label
Studio, oracle, review page), and `genstress correct --relabel` applying them to D."""

import base64
import contextlib
import csv
import io
import json
import urllib.request

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from genstress_ray.cli import main
from genstress_ray.data import decode_images, get_source, to_float
from genstress_ray.labeling import labels_table, write_labels
from genstress_ray.labeling.review import ReviewServer
from genstress_ray.models import ModelRef, load_generator
from genstress_ray.regions import assign_real
from genstress_ray.repair import DECIDERS, KEEP, ranked, read_proposals, read_relabels, validate_relabels

from browser import CHROMIUM


def _train_membership(store):
    """Recomputed here: the digits training split encoded with the run's generator and assigned to the
    regions by radius (the 0.9 quantile)."""
    train = get_source("digits", split="train").load()
    generator = load_generator(ModelRef(store.read_manifest()["models"]["generator"]), (1, 8, 8))
    with torch.no_grad():
        latents = generator.encode(to_float(train.images))[0].numpy()
    faults = store.read_table("identify", columns=["latent"], filter=pc.field("fault"))
    membership = assign_real(store.read_table("regions"), np.stack(faults["latent"].to_numpy(zero_copy_only=False)),
                             latents, 0.9)
    return train, membership.region


@pytest.fixture
def repair_run(tiny_config, request):
    """The tiny run (centred noise: regions around real images' latents) with its region of most
    training members labelled a failure of class 3."""
    tiny_config["strategy"]["centred"] = True
    store = request.getfixturevalue("labelled_run")
    train, region = _train_membership(store)
    rid = int(np.bincount(region[region >= 0]).argmax())
    write_labels(store, labels_table([{"region_id": rid, "label": "3", "is_failure": True, "source": "human"}]),
                 [str(i) for i in range(10)])
    expected = sorted(train.source_ids[i] for i in np.flatnonzero((region == rid) & (train.labels != 3)))
    assert len(expected) >= 3
    return store, expected


def _sheet(store) -> list[dict]:
    return list(csv.DictReader(io.StringIO(store.fs.cat_file(f"{store.stage_path('proposals')}/proposals.csv")
                                           .decode())))


def _write_sheet(path, rows) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _decide(store, capsys, *args) -> dict:
    assert main(["repair", store.uri, *args]) == 0, capsys.readouterr().err
    return {r["sample_id"]: r for r in read_relabels(store).to_pylist()}


@pytest.mark.slow
def test_proposals_decisions_and_a_relabelled_correction(repair_run, tmp_path, capsys):
    store, expected = repair_run
    assert main(["repair", store.uri, "--retrieval", "radius"]) == 0
    assert "proposed for relabelling by 1 failure regions (retrieval: radius)" in capsys.readouterr().out
    proposals = read_proposals(store)
    ids = sorted(proposals["sample_id"].to_pylist())
    assert ids == expected
    assert set(proposals["proposed_label"].to_pylist()) == {"3"}
    # The CSV: a row for the region, then one per proposal, an empty accept column. Filled in image by
    # image: the first rejected, one left blank.
    rows = _sheet(store)
    assert [r["sample_id"] for r in rows[:1]] == [""] and all(r["accept"] == "" for r in rows)
    rows = rows[1:]
    assert sorted(r["sample_id"] for r in rows) == ids
    for i, r in enumerate(rows):
        r["accept"] = "no" if i == 0 else ("" if i == 1 else "yes")
    decided = _decide(store, capsys, "--file", _write_sheet(tmp_path / "decisions.csv", rows))
    assert rows[1]["sample_id"] not in decided and not decided[rows[0]["sample_id"]]["accepted"]
    accepted = sorted(r["sample_id"] for r in rows[2:])
    assert sorted(s for s, d in decided.items() if d["accepted"]) == accepted

    # Correction applies exactly the accepted relabels to D.
    assert main(["correct", store.uri, "--relabel", "--lambdas", "1", "--no-baseline", "--workers", "0"]) == 0
    assert "training labels changed" in capsys.readouterr().out
    results = json.loads(store.fs.cat_file(f"{store.path}/correction/results.json"))
    changes = results["relabels"]["changes"]
    assert sorted(c["sample_id"] for c in changes) == accepted and {c["to"] for c in changes} == {"3"}
    assert main(["report", store.uri]) == 0
    assert "id='relabels'" in store.fs.cat_file(f"{store.path}/report/index.html").decode()

    # Label Studio: the tasks exported with the proposals, annotated, imported (KEEP rejects).
    # The region's task first (its contact sheet, no sample_id), then one per image.
    tasks = json.loads(store.fs.cat_file(f"{store.stage_path('proposals')}/label_studio_tasks.json"))
    region_task, image_tasks = tasks[0], tasks[1:]
    assert region_task["data"]["sample_id"] == "" and region_task["data"]["images"] == len(ids)
    sheet = decode_images([base64.b64decode(region_task["data"]["image"].split(",", 1)[1])], ["sheet"], None)[0]
    h = w = 8  # the digits' size: 4 columns of tiles 2 px apart
    assert sheet.shape == (1, -(-min(len(ids), 16) // 4) * (h + 2) - 2, min(len(ids), 4) * (w + 2) - 2)
    assert sorted(t["data"]["sample_id"] for t in image_tasks) == ids
    config = store.fs.cat_file(f"{store.stage_path('proposals')}/label_studio_config.xml").decode()
    assert f'<Choice value="{KEEP}"/>' in config and '<Choice value="3"/>' in config
    for i, t in enumerate(image_tasks):
        t["annotations"] = [{"result": [{"value": {"choices": [KEEP if i == 0 else "3"]}}]}]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(image_tasks))
    decided = _decide(store, capsys, "--import-label-studio", str(export))
    assert sum(d["accepted"] for d in decided.values()) == len(ids) - 1
    assert decided[image_tasks[0]["data"]["sample_id"]]["label"] is None
    # The region accepted whole in one annotation, the image kept before staying an exception (without
    # its row the region's decision would contradict it: refused, nothing written).
    region_task["annotations"] = [{"result": [{"value": {"choices": ["3"]}}]}]
    export.write_text(json.dumps([region_task]))
    assert main(["repair", store.uri, "--import-label-studio", str(export)]) == 2
    assert image_tasks[0]["data"]["sample_id"] in capsys.readouterr().err
    export.write_text(json.dumps([region_task, image_tasks[0]]))
    decided = _decide(store, capsys, "--import-label-studio", str(export))
    kept = image_tasks[0]["data"]["sample_id"]
    assert [s for s, d in decided.items() if not d["accepted"]] == [kept] and len(decided) == len(ids)
    assert not decided[kept]["by_region"] and sum(d["by_region"] for d in decided.values()) == len(ids) - 1
    image_tasks[1]["annotations"] = [{"result": [{"value": {"choices": ["3"]}}]}]
    region_task["annotations"] = [{"result": [{"value": {"choices": [KEEP]}}]}]
    export.write_text(json.dumps([region_task, image_tasks[1]]))
    decided = _decide(store, capsys, "--import-label-studio", str(export))
    assert [s for s, d in decided.items() if d["accepted"]] == [image_tasks[1]["data"]["sample_id"]]

    # A decision on a row that was not proposed is named, and the decisions stay as they were.
    (tmp_path / "bad.csv").write_text("sample_id,accept\ndigits:train:nope,yes\n")
    assert main(["repair", store.uri, "--file", str(tmp_path / "bad.csv")]) == 2
    assert "digits:train:nope" in capsys.readouterr().err
    assert _decide(store, capsys) == decided

    # The oracle: accepted exactly where it disagrees with the dataset label.
    decided = _decide(store, capsys, "--oracle", store.read_manifest()["models"]["classifier"])
    assert sorted(decided) == ids
    assert all(d["accepted"] == (d["label"] != p) for d, p in
               zip((decided[s] for s in proposals["sample_id"].to_pylist()), proposals["dataset_label"].to_pylist()))


def test_the_review_page_shows_proposal_cards_and_saves_decisions(repair_run, request):
    store, _ = repair_run
    assert main(["repair", store.uri]) == 0
    proposals = ranked(read_proposals(store))
    first, region = proposals[0]["sample_id"], proposals[0]["region_id"]  # the page's first card: the most likely
    mine = [p for p in proposals if p["region_id"] == region]
    server = ReviewServer(store, per_region=3)
    server.start()
    try:
        html = urllib.request.urlopen(server.url).read().decode()
        assert "Relabelling proposals" in html and html.count("class='cell proposal'") == read_proposals(store).num_rows
        body = json.dumps({"sample_id": first, "accept": False}).encode()
        post = urllib.request.Request(server.url.replace("/?", "/api/relabel?"), body,
                                      {"Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(post).read()) == {"sample_id": first, "accepted": False}
        assert {r["sample_id"]: r["accepted"] for r in read_relabels(store).to_pylist()} == {first: False}
        # The region decided whole: every other proposal relabelled, the image decided on its own kept.
        body = json.dumps({"region_id": region, "accept": True}).encode()
        post = urllib.request.Request(server.url.replace("/?", "/api/relabel?"), body,
                                      {"Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(post).read())["decided"] == len(mine) - 1
        decided = {r["sample_id"]: r for r in read_relabels(store).to_pylist()}
        assert sorted(decided) == sorted(p["sample_id"] for p in mine)
        assert not decided[first]["accepted"] and not decided[first]["by_region"]
        assert all(d["accepted"] and d["by_region"] for s, d in decided.items() if s != first)
        html = urllib.request.urlopen(server.url).read().decode()
        assert f"data-repair='{region}'" in html and "saved: relabel (region)" in html
        bad = urllib.request.Request(server.url.replace("/?", "/api/relabel?"),
                                     json.dumps({"sample_id": first, "accept": "yes"}).encode())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad)
        assert err.value.code == 400
        if CHROMIUM is None:
            pytest.skip("no chromium on PATH (Debian package 'chromium'): the cards were not clicked in a browser")
        page = request.getfixturevalue("page")
        page.goto(server.url)
        page.locator("#proposal-0 button[data-accept='true']").click()
        # A selector, not a JS string: the page's CSP forbids eval, which Playwright's polling needs.
        page.wait_for_selector("#status-proposal-0:text-is('saved: relabel')")
        assert {r["sample_id"]: r["accepted"] for r in read_relabels(store).to_pylist()}[first] is True
        # The region's "keep them all" button: the page reloads with every other card kept.
        page.locator(f"button[data-repair='{region}'][data-accept='false']").click()
        page.locator("#status-proposal-1", has_text="saved: keep (region)").wait_for()  # after the reload
        decided = {r["sample_id"]: r["accepted"] for r in read_relabels(store).to_pylist()}
        assert decided[first] is True and not any(a for s, a in decided.items() if s != first)
        assert page.console_errors == []
    finally:
        server.shutdown()


def _decisions_file(store, tmp_path) -> str:
    path = tmp_path / "decisions.csv"
    path.write_text("sample_id,accept\n" + "".join(f"{s},yes\n" for s in read_proposals(store)["sample_id"].to_pylist()))
    return str(path)


def _decisions_export(store, tmp_path) -> str:
    tasks = json.loads(store.fs.cat_file(f"{store.stage_path('proposals')}/label_studio_tasks.json"))
    for t in tasks:
        t["annotations"] = [{"result": [{"value": {"choices": ["3"]}}]}]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    return str(path)


# What each registered relabelling method is given on the command line.
DECIDER_VALUE = {"oracle": lambda store, tmp_path: store.read_manifest()["models"]["classifier"],
                 "file": _decisions_file, "import_label_studio": _decisions_export}


def test_every_relabelling_method_has_a_test_input():
    assert set(DECIDERS) == set(DECIDER_VALUE), "add the new method's input to DECIDER_VALUE"


@pytest.mark.parametrize("name", DECIDERS.names())
def test_a_relabelling_method_decides_every_proposal_validly(name, repair_run, tmp_path):
    store, expected = repair_run
    assert main(["repair", store.uri, "--retrieval", "radius"]) == 0
    table = DECIDERS.get(name).label(store, DECIDER_VALUE[name](store, tmp_path), {})
    validate_relabels(table, read_proposals(store), [str(i) for i in range(10)])
    assert sorted(table["sample_id"].to_pylist()) == expected


def test_relabel_without_decisions_is_refused_and_changes_nothing(labelled_run, capsys):
    store = labelled_run
    assert main(["correct", store.uri, "--lambdas", "1", "--no-baseline", "--workers", "0"]) == 0
    before = {p: store.fs.cat_file(p) for p in store.fs.find(store.path)}
    assert main(["correct", store.uri, "--relabel"]) == 2
    assert "no relabelling decisions" in capsys.readouterr().err
    assert {p: store.fs.cat_file(p) for p in store.fs.find(store.path)} == before


def test_one_decision_per_region_with_exceptions_and_ranked_proposals(repair_run, tmp_path, capsys):
    """The sheet opens each region with a row deciding it whole, its images ranked most typical first;
    an image's own row is an exception; a later region decision that contradicts an image decided on
    its own is refused whole, and earlier decisions are never lost."""
    store, expected = repair_run
    assert main(["repair", store.uri, "--retrieval", "radius"]) == 0
    sheet = _sheet(store)
    region_row, images = sheet[0], sheet[1:]
    assert region_row["sample_id"] == "" and region_row["dataset_label"] == f"{len(expected)} images"
    scores = dict(zip(*(read_proposals(store)[c].to_pylist() for c in ("sample_id", "score"))))
    ranked = [scores[r["sample_id"]] for r in images]
    assert ranked == sorted(ranked, reverse=True) and all(np.isfinite(ranked))

    exception = images[-1]["sample_id"]
    region_row["accept"], images[-1]["accept"] = "yes", "no"
    decided = _decide(store, capsys, "--file", _write_sheet(tmp_path / "whole.csv", [region_row, *images]))
    assert sorted(decided) == expected
    assert not decided[exception]["accepted"] and not decided[exception]["by_region"]
    assert all(d["accepted"] and d["by_region"] and d["label"] == "3" for s, d in decided.items() if s != exception)

    # The region rejected whole: agrees with the exception, replaces the region's own earlier answer.
    region_row["accept"], images[-1]["accept"] = "no", ""
    decided = _decide(store, capsys, "--file", _write_sheet(tmp_path / "reject.csv", [region_row, *images]))
    assert not any(d["accepted"] for d in decided.values())
    # An image accepted on its own, then the region rejected again without that exception: refused.
    only = {**images[0], "accept": "yes"}
    decided = _decide(store, capsys, "--file", _write_sheet(tmp_path / "one.csv", [only]))
    assert decided[only["sample_id"]]["accepted"] and len(decided) == len(expected)  # the others kept
    assert main(["repair", store.uri, "--file", str(tmp_path / "reject.csv")]) == 2
    err = capsys.readouterr().err
    assert "contradict earlier per-image decisions" in err and only["sample_id"] in err
    assert _decide(store, capsys) == decided

    # A region row naming a region without proposals, or none: named, nothing written.
    for bad in ("99", "x"):
        path = _write_sheet(tmp_path / f"bad-{bad}.csv", [{**region_row, "region_id": bad, "accept": "yes"}])
        assert main(["repair", store.uri, "--file", path]) == 2
        assert "row 1" in capsys.readouterr().err
    assert _decide(store, capsys) == decided


def test_the_oracle_decides_by_region_from_a_grid_then_exceptions(repair_run, capsys):
    """--grid N: a region is accepted whole when the reference calls most of its N most likely
    proposals by the proposed label; --exceptions M: then the M least likely proposals of accepted
    regions are decided one by one."""
    from genstress_ray.data import decode_images
    from genstress_ray.models import load_classifier
    from genstress_ray.models.training import images_predictions

    store, _ = repair_run
    checkpoint = store.read_manifest()["models"]["classifier"]
    assert main(["repair", store.uri]) == 0
    proposals = ranked(read_proposals(store))
    reference = load_classifier(ModelRef(checkpoint), [str(i) for i in range(10)], (1, 8, 8))
    calls = images_predictions(reference, decode_images([r["image"] for r in proposals],
                                                        [r["sample_id"] for r in proposals], None))
    call = {r["sample_id"]: str(c) for r, c in zip(proposals, calls.tolist())}
    by_region: dict[int, list[dict]] = {}
    for r in proposals:
        by_region.setdefault(r["region_id"], []).append(r)
    accept = {rid: sum(call[r["sample_id"]] == r["proposed_label"] for r in rows[:4]) * 2 > len(rows[:4])
              for rid, rows in by_region.items()}

    decided = _decide(store, capsys, "--oracle", checkpoint, "--grid", "4", "--exceptions", "3")
    assert sorted(decided) == sorted(call)
    accepted_rows = sorted((r for r in proposals if accept[r["region_id"]]), key=lambda r: r["score"])
    exceptions = {r["sample_id"] for r in accepted_rows[:3]}
    assert {s for s, d in decided.items() if not d["by_region"]} == exceptions
    for r in proposals:
        d = decided[r["sample_id"]]
        if r["sample_id"] in exceptions:
            assert d["accepted"] == (call[r["sample_id"]] != r["dataset_label"]) and d["label"] == call[r["sample_id"]]
        else:
            assert d["accepted"] == accept[r["region_id"]] and d["label"] == r["proposed_label"]


def test_decisions_on_proposals_of_old_region_labels_are_refused_until_made_again(repair_run, tmp_path, capsys):
    """Regions labelled again after the proposals were made: deciding is refused, naming the change;
    after --again new decisions are taken and the earlier ones are kept."""
    store, _ = repair_run
    assert main(["repair", store.uri]) == 0
    first = ranked(read_proposals(store))[0]
    decided = _decide(store, capsys, "--file", _write_sheet(tmp_path / "one.csv", [{"sample_id": first["sample_id"],
                                                                                 "accept": "no"}]))
    region = first["region_id"]
    write_labels(store, labels_table([{"region_id": region, "label": "5", "is_failure": True, "source": "human"}]),
                 [str(i) for i in range(10)])
    assert main(["repair", store.uri, "--oracle", store.read_manifest()["models"]["classifier"]]) == 2
    err = capsys.readouterr().err
    assert f"region {region}: 3 -> 5" in err and "--again" in err
    assert _decide(store, capsys) == decided
    assert main(["repair", store.uri, "--again"]) == 0
    assert set(read_proposals(store)["proposed_label"].to_pylist()) <= {"5"}
    again = _decide(store, capsys, "--oracle", store.read_manifest()["models"]["classifier"])
    assert again[first["sample_id"]] == decided[first["sample_id"]] or first["sample_id"] in set(
        read_proposals(store)["sample_id"].to_pylist())
    assert set(read_proposals(store)["sample_id"].to_pylist()) <= set(again)


@pytest.mark.parametrize("args, message", [
    (["--grid", "3"], "add --oracle"), (["--oracle", "--exceptions", "5"], "add --grid N"),
    (["--oracle", "--grid", "-1"], "not a whole number of 0 or more")])
def test_oracle_review_options_are_checked_before_anything(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) if "whole number" in message else contextlib.nullcontext():
        assert main(["repair", str(tmp_path / "no-run"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "no-run").exists()
