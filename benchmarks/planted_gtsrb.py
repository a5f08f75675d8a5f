"""A second planted flaw, of another kind and data set: dark yield signs labelled "priority road" in GTSRB.

    python benchmarks/planted_gtsrb.py [--output DIR] [--lambdas 0.1 1]

The bug: in GTSRB's training, validation and search images alike (``jobs/gtsrb_defuse.yaml``'s split),
the darker half of the "13_yield" signs (mean brightness below the median of the training split's yield
signs) are labelled "12_priority_road" (a white triangle with a red border called a yellow diamond:
a subgroup by lighting, not by shape as in the MNIST benchmark). The data is written as one Parquet
file (the ``parquet`` source, with the image folder's own keys and split), the classifier under test is
trained on it by ``genstress train classifier`` (the job's recipe), and the job's oracle (trained on the
true labels) labels the regions. Real held-out images: the test split's half that is never searched,
with their true labels; the subgroup is its dark yield signs.

Then the planted-bug workflow (``benchmarks/planted_bug.py``): ``genstress run`` with the job's search
settings (``--accept-low-fidelity``: the VAE's fidelity is about 50%), oracle labels, repair with each
retrieval, region-level decisions, cleanlab and the clean oracle beside it, and ``genstress correct
--relabel``. Writes benchmarks/results/planted_gtsrb.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
IMAGES = ROOT.parent / "shared" / "data" / "gtsrb" / "images"
RESULTS = ROOT / "benchmarks" / "results" / "planted_gtsrb.json"
TRUE, WRONG, SHARE = "13_yield", "12_priority_road", 0.5


def _split(name: str):
    from genstress_ray.data import get_source

    return get_source("image_folder", uri=str(IMAGES), split=name, mode="RGB").load()


def plant(path: Path) -> dict:
    """Write the planted Parquet (every image, its key, split and planted label); return what was planted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from genstress_ray.data import png_bytes

    splits = {name: _split(name) for name in ("train", "validation", "test")}
    train = splits["train"]
    true = train.class_names.index(TRUE)
    brightness = {n: s.images.reshape(len(s.images), -1).mean(1) for n, s in splits.items()}
    threshold = float(np.quantile(brightness["train"][train.labels == true], SHARE))
    rows, planted = [], {}
    for name, split in splits.items():
        flawed = (split.labels == true) & (brightness[name] < threshold)
        planted[name] = [sid.split(":", 2)[2] for sid, f in zip(split.source_ids, flawed) if f]
        for image, label, sid, f in zip(split.images, split.labels, split.source_ids, flawed):
            rows.append({"key": sid.split(":", 2)[2], "split": name, "image": png_bytes(image),
                         "label": WRONG if f else split.class_names[label]})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return {"threshold": threshold, "planted_keys": planted,
            "planted_train": len(planted["train"]), "yield_train": int((train.labels == true).sum())}


def held_out(search_share: list[float], threshold: float):
    """The test split's never-searched images with their true labels, and which are the dark yield signs."""
    from genstress_ray.data import ImageSet
    from genstress_ray.data.base import in_share

    test = _split("test")
    keys = [sid.split(":", 2)[2] for sid in test.source_ids]
    rest = ~np.asarray(in_share(keys, search_share, 0))
    test = ImageSet(test.images[rest], test.labels[rest], [s for s, r in zip(test.source_ids, rest) if r],
                    test.class_names)
    subgroup = (test.labels == test.class_names.index(TRUE)) & (
        test.images.reshape(len(test.images), -1).mean(1) < threshold)
    return test, subgroup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=tempfile.mkdtemp(prefix="genstress-planted-gtsrb-"))
    parser.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "genstress-planted-gtsrb"))
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rho", type=float, default=0.25)
    parser.add_argument("--per-region", type=int, default=100)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--exceptions", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="genstress: %(message)s")

    import yaml

    from genstress_ray import labeling
    from genstress_ray.context import RunContext, load_split
    from genstress_ray.pipeline import run_campaign
    from genstress_ray.storage import RunStore
    from planted_bug import correct, repair_study, scores

    started = time.time()
    root = Path(args.data)
    data = root / "planted.parquet"
    planted = plant(data)
    classifier = root / "classifier.safetensors"
    # The job's classifier recipe (its header), on the planted labels.
    subprocess.run(["genstress", "train", "classifier", "--data", "parquet", "--data-uri", str(data), "--epochs", "10",
                    "--threads", str(args.threads), "--output", str(classifier)], check=True, cwd=ROOT)
    cfg = yaml.safe_load((ROOT / "jobs" / "gtsrb_defuse.yaml").read_text())
    source = {"kind": "parquet", "uri": str(data), "options": {"id_column": "key"}}
    share = cfg["data"]["search"]["share"]
    cfg.update(campaign="planted-gtsrb", output=args.output, run_id="benchmark",
               classifier={"uri": str(classifier)}, checks={"accept_low_fidelity": True})
    cfg["generator"]["uri"] = str(ROOT / cfg["generator"]["uri"])
    cfg["oracle"]["uri"] = str(ROOT / cfg["oracle"]["uri"])
    cfg["data"] = {"search": {**source, "split": "test", "share": share}, "train": {**source, "split": "train"},
                   "validation": {**source, "split": "validation"}}
    # Verdicts on the never-searched half of the test split with its true labels (the image folder's).
    cfg["correction"].update(lambdas=args.lambdas, test={"kind": "image_folder", "uri": str(IMAGES), "split": "test",
                                                         "share": [share[1], 1.0], "options": {"mode": "RGB"}})
    test, subgroup = held_out(share, planted["threshold"])

    campaign = run_campaign(cfg)
    print(campaign.summary(), flush=True)
    store = RunStore.from_uri(campaign.run_uri)
    ctx = RunContext.open(store.uri)
    labeling.write_labels(store, labeling.label_run(store, ctx.oracle(), rho=args.rho, per_region=args.per_region),
                          ctx.class_names)
    failures = [r["region_id"] for r in store.read_table("labels").to_pylist()
                if r["region_id"] is not None and r["is_failure"]]
    result = {"planted": {k: v for k, v in planted.items() if k != "planted_keys"},
              "subgroup_test": int(subgroup.sum()), "rest_test": int((~subgroup).sum()),
              "candidates": campaign.counts.get("candidates"), "faults": campaign.counts.get("faults"),
              "regions": campaign.counts.get("regions"), "failure_regions": len(failures),
              "rho": args.rho, "per_region": args.per_region, "before": scores(str(classifier), test, subgroup)}
    train = load_split(ctx.cfg.data.train_spec())
    planted_ids = {sid for sid in train.source_ids if sid.split(":", 2)[2] in set(planted["planted_keys"]["train"])}
    result["repair"] = repair_study(ctx, train, planted_ids, args.grid, args.exceptions, "small_cnn", {"epochs": 10},
                                    args.threads)
    print(json.dumps(result, indent=2), flush=True)
    result["repair"]["correction"] = correct(store.uri, {"region_data": "generated", "relabel": True,
                                                         "baseline": False}, test, subgroup)
    result.update(seconds=round(time.time() - started, 1), command="python benchmarks/planted_gtsrb.py",
                  run=store.uri, machine={"platform": platform.platform(), "python": platform.python_version()})
    print(json.dumps(result, indent=2))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
