"""A planted bug: does the documented workflow find a flaw that mislabelled training data put into a
classifier, and does the fix hold on real images?

    python benchmarks/planted_bug.py [--output DIR] [--lambdas 0.01 0.1 1 10 100]

The bug: in MNIST's training images (../shared/data/mnist_train_first20k) and in the search images
(the first 5,000 of MNIST's test set) alike, the 30% most right-leaning 1s are labelled 7 (slant: the
image's shear moment -mu11/mu02; the threshold is the 70th percentile over the training set's 1s). A
small CNN trained on those labels is the classifier under test; the same CNN trained on the true labels
is the oracle. Real held-out images are the other 5,000 test images with their true labels: the
subgroup is their 1s above the same slant threshold, the rest is every other image.

Workflow, as the README documents it: ``genstress run`` (Defuse, jobs/mnist_defuse.yaml's settings),
oracle labels, then data repair: ``genstress repair --oracle`` with each retrieval (every proposal
decided), the default retrieval decided as a reviewer would (``--grid 16 --exceptions 200``: one
decision per region, then 200 images one by one), and ``genstress correct --relabel`` on those
decisions. Beside it, on the same training split: cleanlab's ``find_label_issues`` on 3-fold
out-of-fold probabilities of the classifier's recipe, and the clean oracle diffed over D (an upper bound
a user rarely has). ``--region-data`` adds a correction per ``correction.region_data`` without
relabelling. Lambda is chosen with ``select_by: combined``. Writes benchmarks/results/planted_bug.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "planted_bug.json"
SHARE, TRUE, WRONG = 0.3, 1, 7  # the most slanted 30% of the 1s are labelled 7
REGION_DATA = ("generated", "real", "both", "augmented")


def slant(images: np.ndarray) -> np.ndarray:
    """How far each image's strokes lean right (top to the right): -mu11 / mu02 of its ink."""
    w = images.reshape(len(images), 28, 28).astype(np.float64)
    y, x = np.mgrid[:28, :28]
    m = w.sum((1, 2))
    cx, cy = (w * x).sum((1, 2)) / m, (w * y).sum((1, 2)) / m
    dx, dy = x - cx[:, None, None], y - cy[:, None, None]
    return -(w * dx * dy).sum((1, 2)) / (w * dy * dy).sum((1, 2))


def _save(folder: Path, part: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / f"x_{part}.npz", images)
    np.savez_compressed(folder / f"y_{part}.npz", labels)


def plant(root: Path) -> dict:
    """Write the planted and clean data folders; return what was planted."""
    from genstress_ray.data import get_source

    train = get_source("mnist", uri=str(DATA / "mnist_train_first20k"), split="train", validation_fraction=0.0).load()
    test = get_source("mnist", uri=str(DATA / "mnist"), split="test").load()
    x_train, y_train = train.images[:, 0], train.labels.copy()
    x_test, y_test = test.images[:, 0], test.labels.copy()
    threshold = float(np.quantile(slant(x_train[y_train == TRUE]), 1 - SHARE))
    in_train = (y_train == TRUE) & (slant(x_train) > threshold)
    in_test = (y_test == TRUE) & (slant(x_test) > threshold)
    planted_train, planted_test = y_train.copy(), y_test.copy()
    planted_train[in_train], planted_test[in_test] = WRONG, WRONG
    _save(root / "planted", "train", x_train, planted_train)
    _save(root / "planted", "test", x_test[:5000], planted_test[:5000])
    _save(root / "clean", "train", x_train, y_train)
    _save(root / "clean_test", "test", x_test[5000:], y_test[5000:])
    return {"threshold": threshold, "planted_train_rows": np.flatnonzero(in_train).tolist(),
            "planted_search": int(in_test[:5000].sum()), "subgroup_test": int(in_test[5000:].sum()),
            "ones_train": int((y_train == TRUE).sum())}


def config(root: Path, output: str, oracle: str, lambdas: list[float]) -> dict:
    """jobs/mnist_defuse.yaml on the planted data, with the clean oracle and the clean test images."""
    import yaml

    cfg = yaml.safe_load((ROOT / "jobs" / "mnist_defuse.yaml").read_text())
    planted = str(root / "planted")
    cfg.update(campaign="planted-bug", output=output, run_id="benchmark", oracle={"uri": oracle})
    cfg["data"] = {"search": {"kind": "mnist", "uri": planted, "split": "test"},
                   "train": {"kind": "mnist", "uri": planted, "split": "train", "validation_fraction": 0.1},
                   "validation": {"kind": "mnist", "uri": planted, "split": "validation", "validation_fraction": 0.1}}
    cfg["correction"].update(lambdas=lambdas, select_by="combined",
                             test={"kind": "mnist", "uri": str(root / "clean_test"), "split": "test"})
    return cfg


def held_out(root: Path, threshold: float):
    """The clean held-out images split into the subgroup (slanted 1s) and the rest."""
    from genstress_ray.data import get_source

    test = get_source("mnist", uri=str(root / "clean_test"), split="test").load()
    subgroup = (test.labels == TRUE) & (slant(test.images[:, 0]) > threshold)
    return test, subgroup


def scores(uri: str, test, subgroup: np.ndarray) -> dict:
    from genstress_ray.models import load_module
    from genstress_ray.models.training import images_accuracy

    net = load_module(uri)[0]
    return {"subgroup_acc": images_accuracy(net, test.images[subgroup], test.labels[subgroup]),
            "rest_acc": images_accuracy(net, test.images[~subgroup], test.labels[~subgroup])}


def correct(run_uri: str, overrides: dict, test, subgroup) -> dict:
    """One correction; the chosen models' subgroup / rest accuracy and the run's own figures."""
    from genstress_ray.storage import RunStore
    from mnist_defuse import correct_confirming

    started = time.time()
    done, confirmed = correct_confirming(run_uri, RunStore.from_uri(run_uri), overrides)
    print(done.summary(), flush=True)
    r = done.results
    real = r.get("real_members", {}).get("overall", {})
    out = {}
    for method in ("defuse", "baseline"):
        if method in r:
            out[method] = {**scores(r[method]["checkpoint"], test, subgroup), "lam": r[method]["lam"],
                           "test_acc": r[method]["test_acc"], "region_test_acc": r[method].get("region_test_acc"),
                           "real_subgroup_acc": real.get("subgroup", {}).get(method),
                           "real_collateral_acc": real.get("collateral", {}).get(method)}
    # The product's own real-image verdict: held-out images inside the failure regions, own labels.
    out["real_members_before"] = {g: real.get(g, {}).get("before") for g in ("subgroup", "collateral")}
    out["real_members_n"] = {g: real.get(g, {}).get("n") for g in ("subgroup", "collateral")}
    out["relabels"] = r.get("relabels", {}).get("applied")
    out["left_out"], out["confirmed_flagged"] = r.get("left_out", {}), confirmed
    out["seconds"] = round(time.time() - started, 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=tempfile.mkdtemp(prefix="genstress-planted-"))
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0, 100.0])
    parser.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "genstress-planted-data"),
                        help="where the planted data is written (the same path lets the model cache serve reruns)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rho", type=float, default=0.25,
                        help="oracle labels: a failure region when more than rho of its reviewed samples are "
                             "misclassified (the subgroup's region sits on the boundary: about a third are)")
    parser.add_argument("--per-region", type=int, default=100, help="oracle labels: samples reviewed per region")
    parser.add_argument("--grid", type=int, default=16, help="repair: proposals the oracle looks at per region")
    parser.add_argument("--exceptions", type=int, default=200, help="repair: per-image decisions after the regions'")
    parser.add_argument("--region-data", nargs="*", default=[], choices=REGION_DATA,
                        help="also correct once per correction.region_data (no relabelling), as issue 28 measured")
    parser.add_argument("--quick", action="store_true", help="a smoke test of the script: 500 search images, "
                                                             "20 draws, one lambda, one epoch; no results file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="genstress: %(message)s")

    from genstress_ray import labeling
    from genstress_ray.config import DataSpec
    from genstress_ray.context import RunContext, load_split
    from genstress_ray.models.training import train_and_save
    from genstress_ray.pipeline import run_campaign
    from genstress_ray.storage import RunStore

    started = time.time()
    root = Path(args.data)
    planted = plant(root)
    oracle = str(root / "oracle.safetensors")
    cfg = config(root, args.output, oracle, args.lambdas)
    if args.quick:
        cfg["data"]["search"]["limit"], cfg["strategy"]["draws"] = 500, 20
        cfg["correction"].update(lambdas=[1.0], epochs=1)
    # The oracle: jobs/mnist_defuse.yaml's oracle recipe on the true labels.
    clean = {"kind": "mnist", "uri": str(root / "clean"), "validation_fraction": 0.1}
    metrics = train_and_save("classifier", "small_cnn", load_split(DataSpec(**clean, split="train")),
                             load_split(DataSpec(**clean, split="validation")), oracle, {},
                             {"epochs": 1 if args.quick else 6, "batch_size": 64, "lr": 0.001, "seed": 7}, args.threads)
    print(f"oracle trained on the true labels: {metrics}", flush=True)
    test, subgroup = held_out(root, planted["threshold"])

    campaign = run_campaign(cfg)
    print(campaign.summary(), flush=True)
    store = RunStore.from_uri(campaign.run_uri)
    ctx = RunContext.open(store.uri)
    labeling.write_labels(store, labeling.label_run(store, ctx.oracle(), rho=args.rho, per_region=args.per_region,
                                                              fault_labels=5000),
                          ctx.class_names)
    regions = _found_regions(store, ctx.class_names)
    searched = time.time()
    result = {"planted": {k: v for k, v in planted.items() if k != "planted_train_rows"}
              | {"planted_train": len(planted["planted_train_rows"])},
              "oracle_val_acc": metrics.get("val_acc"), "rho": args.rho, "per_region": args.per_region,
              "regions": regions,
              "before": scores(ctx.models["classifier"].uri, test, subgroup), "region_data": {}}
    for choice in args.region_data:
        result["region_data"][choice] = correct(store.uri, {"region_data": choice, "baseline": choice == "generated"},
                                                test, subgroup)

    train = load_split(ctx.cfg.data.train_spec())
    planted_ids = set(train.source_ids) & {f"mnist:train:{i}" for i in planted["planted_train_rows"]}
    recipe = dict(ctx.cfg.classifier.train) | ({"epochs": 1} if args.quick else {})
    result["repair"] = repair_study(ctx, train, planted_ids, args.grid, args.exceptions,
                                    ctx.cfg.classifier.architecture, recipe, args.threads)
    print(json.dumps(result["repair"], indent=2), flush=True)
    result["repair"]["correction"] = correct(store.uri, {"region_data": "generated", "relabel": True,
                                                         "baseline": False}, test, subgroup)
    result.update(seconds={"search_labels": round(searched - started, 1), "total": round(time.time() - started, 1)},
                  command="python benchmarks/planted_bug.py", run=store.uri,
                  machine={"platform": platform.platform(), "python": platform.python_version()})
    print(json.dumps(result, indent=2))
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}")
    return 0


def _found_regions(store, class_names: list[str]) -> list[dict]:
    """The regions the oracle labelled failures, and every region whose faults are mostly 1s called 7
    (the planted flaw): size, top (true, predicted) pairs, label."""
    labels = {r["region_id"]: r for r in store.read_table("labels").to_pylist() if r["region_id"] is not None}
    out = []
    for r in store.read_table("regions").to_pylist():
        pairs = json.loads(r["top_pairs"] or "[]")
        planted_share = sum(share for t, p, share in pairs if (t, p) == (TRUE, WRONG))
        label = labels.get(r["region_id"], {})
        if label.get("is_failure") or planted_share >= 0.3:
            out.append({"region_id": r["region_id"], "faults": r["n_members"], "failure": bool(label.get("is_failure")),
                        "label": label.get("label"), "share_1_called_7": round(planted_share, 3),
                        "pairs": [f"{class_names[t]} -> {class_names[p]} {share:.0%}" for t, p, share in pairs[:3]]})
    return out


def repair_study(ctx, train, planted_ids: set[str], grid: int, exceptions: int, architecture: str, recipe: dict,
                 threads: int) -> dict:
    """Data repair against the planted rows: each retrieval with the oracle deciding every proposal,
    then the default retrieval decided as a reviewer would (one decision per region + ``exceptions``
    images), whose decisions stay in the run for ``correct --relabel``. Peers on the same training
    split: cleanlab (out-of-fold probabilities of the classifier's recipe) and the clean oracle over D."""
    from genstress_ray import repair
    from genstress_ray.labeling.methods import CONFIG_ORACLE
    from genstress_ray.models.training import images_predictions

    store = ctx.store
    out = {"planted_in_train_split": len(planted_ids), "grid": grid, "exceptions": exceptions}
    for retrieval, options in (("radius", {}), ("kind", {}), ("kind", {"grid": grid, "exceptions": exceptions})):
        started = time.time()
        table, info = repair.propose(ctx, ctx.cfg.correction.member_quantile, retrieval)
        repair.write_proposals(store, table, info, ctx.class_names)
        decided = repair.DECIDERS.get("oracle").label(store, CONFIG_ORACLE, options)
        repair.write_relabels(store, decided, ctx.class_names)
        name = retrieval + (", one decision per region" if options else ", every image decided")
        out[name] = _precision_recall(table, decided, planted_ids) | {"seconds": round(time.time() - started, 1)}
    out["cleanlab"] = _cleanlab(train, planted_ids, architecture, recipe, threads)
    disagree = {sid for sid, p, y in zip(train.source_ids, images_predictions(ctx.oracle(), train.images), train.labels)
                if p != y}
    out["clean oracle over D"] = _found(disagree, planted_ids) | {"decisions": len(disagree)}
    return out


def _found(ids: set[str], planted_ids: set[str]) -> dict:
    hits = len(ids & planted_ids)
    return {"n": len(ids), "planted": hits, "precision": hits / len(ids) if ids else None,
            "recall": hits / len(planted_ids) if planted_ids else None}


def _precision_recall(proposals, decided, planted_ids: set[str]) -> dict:
    """Proposals and the accepted relabels against the planted rows of D's training split; decisions
    counts a region decided whole once."""
    rows = decided.to_pylist()
    regions = {r["region_id"] for r in proposals.select(["region_id"]).to_pylist()}
    by_region = any(r["by_region"] for r in rows)
    one_by_one = sum(not r["by_region"] for r in rows)
    return {"proposals": _found(set(proposals["sample_id"].to_pylist()), planted_ids),
            "accepted": _found({r["sample_id"] for r in rows if r["accepted"]}, planted_ids),
            "decisions": (len(regions) if by_region else 0) + one_by_one,
            "region_decisions": len(regions) if by_region else 0, "image_decisions": one_by_one}


def _cleanlab(train, planted_ids: set[str], architecture: str, recipe: dict, threads: int, folds: int = 3) -> dict:
    """cleanlab's find_label_issues on out-of-fold probabilities of the classifier's own recipe."""
    import torch
    from cleanlab.filter import find_label_issues

    from genstress_ray.data import ImageSet, to_float
    from genstress_ray.models import load_module
    from genstress_ray.models.training import train_and_save

    started = time.time()
    order = np.random.default_rng(0).permutation(len(train.labels))
    probs = np.zeros((len(train.labels), len(train.class_names)))

    def part(rows):
        return ImageSet(train.images[rows], train.labels[rows], [train.source_ids[i] for i in rows], train.class_names)

    with tempfile.TemporaryDirectory() as tmp:
        for k in range(folds):
            held = order[k::folds]
            rest = np.setdiff1d(order, held)
            uri = f"{tmp}/fold{k}.safetensors"
            train_and_save("classifier", architecture, part(rest), None, uri, {}, recipe, threads)
            net = load_module(uri)[0].eval()
            with torch.no_grad():
                probs[held] = torch.cat([net(to_float(train.images[held[i:i + 1024]])).softmax(1)
                                         for i in range(0, len(held), 1024)]).numpy()
    issues = find_label_issues(train.labels, probs)
    return _found({train.source_ids[i] for i in np.flatnonzero(issues)}, planted_ids) | {
        "decisions": int(issues.sum()), "folds": folds, "seconds": round(time.time() - started, 1),
        "version": __import__("cleanlab").__version__}


if __name__ == "__main__":
    sys.exit(main())
