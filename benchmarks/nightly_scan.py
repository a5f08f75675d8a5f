"""A scan history to show: three versions of the digits classifier, scanned on three nights.

    python benchmarks/nightly_scan.py [--output DIR]

- v1: the demo's classifier as trained (small_cnn, 4 epochs on the digits resized to 28x28);
- v2: v1 corrected by this project (``genstress correct`` on the first scan's run: Defuse, lambda sweep);
- v3: retrained from scratch with a new flaw: half of the training images of one class labelled as
  another (a class none of v1's failure regions starts from, so its region is new).

Each version is added to a folder registry and scanned with ``jobs/digits_scan.yaml`` on its own
night. Writes benchmarks/results/nightly_scan.json (statuses, accuracies, wall times) and
benchmarks/results/nightly_scan_trend.png (the report's trend plot); the scan reports stay in DIR.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
SCAN = ROOT / "jobs" / "digits_scan.yaml"
NIGHTS = ("2026-12-01", "2026-12-02", "2026-12-03")
# Flaws v3 may get, (true class, label given to half its training images), first usable one taken.
FLAWS = ((5, 6), (7, 1), (4, 9), (2, 7), (3, 8), (6, 0))


def _train_v(path: Path, campaign, flaw: tuple[int, int] | None = None) -> dict:
    """Train the demo's classifier (its architecture and settings) and save it at ``path``;
    with ``flaw`` = (a, b), half of the training images of class a are labelled b."""
    from genstress_ray.context import load_split
    from genstress_ray.data import ImageSet
    from genstress_ray.models import train_and_save

    train = load_split(campaign.data.train_spec())
    if flaw:
        a, b = flaw
        labels = train.labels.copy()
        rows = np.flatnonzero(labels == a)
        labels[np.random.default_rng(0).permutation(rows)[: len(rows) // 2]] = b
        train = ImageSet(train.images, labels, train.source_ids, train.class_names)
    spec = campaign.classifier
    path.parent.mkdir(parents=True, exist_ok=True)
    return train_and_save("classifier", spec.architecture, train, load_split(campaign.data.validation_spec()),
                          str(path), spec.params, spec.train, campaign.threads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=tempfile.mkdtemp(prefix="genstress-nightly-"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="genstress: %(message)s")
    from mnist_defuse import correct_confirming

    from genstress_ray.scan import load_scan_config, run_scan
    from genstress_ray.storage import RunStore
    from genstress_ray.scan.report import trend, trend_png

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    registry = out / "registry"
    cfg, campaigns = load_scan_config(SCAN)
    campaign = next(iter(campaigns.values()))
    overrides = {"registry": str(registry), "output": str(out / "scans")}
    scan_file = out / "scan.yaml"
    scan_file.write_text(yaml.safe_dump({**yaml.safe_load(SCAN.read_text()), **overrides,
                                         "campaigns": [str(SCAN.parent / c) for c in cfg.campaigns]}))
    timings, scans = {}, []

    t0 = time.time()
    _train_v(registry / "v1" / "model.safetensors", campaign)
    timings["train v1"] = time.time() - t0
    scans.append(run_scan(scan_file, NIGHTS[0]))
    print(scans[-1].summary(), flush=True)

    t0 = time.time()
    run = scans[-1].record["strategies"][campaign.campaign]["run"]
    correction, confirmed = correct_confirming(run, RunStore.from_uri(run))
    print(correction.summary(), flush=True)
    (registry / "v2").mkdir()
    shutil.copy(correction.results["defuse"]["checkpoint"], registry / "v2" / "model.safetensors")
    timings["correct v1 -> v2"] = time.time() - t0
    scans.append(run_scan(scan_file, NIGHTS[1]))
    print(scans[-1].summary(), flush=True)

    t0 = time.time()
    # A class no failure region of v1 starts from ("true 3 -> predicted 9 (62%), ..."), so v3's region is new.
    sources = {int(c) for r in scans[0].record["regions"] for c in re.findall(r"true (\d+) ->", r["pairs"])}
    flaw = next(f for f in FLAWS if f[0] not in sources)
    _train_v(registry / "v3" / "model.safetensors", campaign, flaw)
    timings["train v3"] = time.time() - t0
    scans.append(run_scan(scan_file, NIGHTS[2]))
    print(scans[-1].summary(), flush=True)

    history = [s.record for s in scans]
    results = ROOT / "benchmarks" / "results"
    (results / "nightly_scan_trend.png").write_bytes(trend_png(history))
    summary = {
        "command": "python benchmarks/nightly_scan.py", "machine": f"{platform.machine()}, {platform.node()}",
        "flaw_v3": {"class": flaw[0], "labelled_as": flaw[1], "share": 0.5},
        "correction_v2": {**{k: correction.results.get(k) for k in ("before", "defuse", "n_failure_regions",
                                                                     "real_members", "left_out")},
                          "confirmed_flagged": confirmed},
        "scans": [{"date": s.record["date"], "version": s.record["version"]["version"], "seconds": s.record["seconds"],
                   "strategies": s.record["strategies"], "alerts": s.alerts} for s in scans],
        "regions": [{"id": r["id"], "label": r["label"], "found_as": r["pairs"],
                     "history": [{k: h.get(k) for k in ("date", "version", "status", "accuracy", "real_subgroup",
                                                      "real_subgroup_n", "real_collateral", "real_collateral_n",
                                                      "matched", "closest")} for h in r["history"]]}
                    for r in scans[-1].record["regions"]],
        "trend": trend(history),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "reports": [f"{s.uri}/index.html" for s in scans],
    }
    (results / "nightly_scan.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["seconds"]), "\nreports:", *summary["reports"], sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
