"""The Defuse paper's traffic-sign setting on GTSRB, scaled to 2 cores: train the classifier, the beta-VAE
and an oracle with ``genstress train``, then identify -> regions -> oracle labels -> correction -> report.

    python benchmarks/gtsrb_defuse.py [--output DIR] [--run-id ID] [--accept-low-fidelity]

Runs from the repository root on ../shared/data/gtsrb (7,949 RGB 35x35 images, 43 classes; the split is
a function of each image's path: 70% train, 10% validation, 20% test). The models are trained by the
commands in jobs/gtsrb_defuse.yaml's header (skipped when their files exist) and the campaign runs that
job. Results: benchmarks/results/gtsrb_defuse.json. The paper (ResNet-18 at 128x128): 38 scenarios,
8 failure regions, region test accuracy 27.8% -> 85.6%, test 98.7% -> 97.7%.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "gtsrb_defuse.yaml"
sys.path.insert(0, str(ROOT / "benchmarks"))


def train_commands() -> list[list[str]]:
    """The ``genstress train`` commands of the job's header, as argument lists."""
    return [shlex.split(line.split("#", 1)[1].strip()) for line in JOB.read_text().splitlines()
            if line.startswith("#   genstress train ")]


def main() -> int:
    from mnist_defuse import run_defuse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=tempfile.mkdtemp(prefix="genstress-gtsrb-"))
    parser.add_argument("--run-id", default="benchmark")
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--accept-low-fidelity", action="store_true",
                        help="search although the VAE's reconstructions fall below checks.min_fidelity (the "
                             "results then say so)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="genstress: %(message)s")
    trained = {}
    for command in train_commands():
        out = ROOT / command[command.index("--output") + 1]
        if not out.exists():
            print("$", shlex.join(command), flush=True)
            subprocess.run(command, cwd=ROOT, check=True)
        trained[shlex.join(command)] = _metrics(out)
    cfg = yaml.safe_load(JOB.read_text())
    for role in ("classifier", "generator", "oracle"):
        cfg[role]["uri"] = str(ROOT / cfg[role]["uri"])
    for spec in cfg["data"].values():
        spec["uri"] = str((ROOT / spec["uri"]).resolve())
    if args.accept_low_fidelity:
        cfg.setdefault("checks", {})["accept_low_fidelity"] = True
    command = "python benchmarks/gtsrb_defuse.py" + (" --accept-low-fidelity" if args.accept_low_fidelity else "")
    run_defuse(cfg, args.output, args.run_id, args.rho, "gtsrb_defuse", command,
               {"models": trained, "split": "image path hash, seed 0: 70% train, 10% validation, 20% test"})
    return 0


def _metrics(uri: Path) -> dict:
    from genstress_ray.models import load_module

    return load_module(str(uri))[1].get("metrics", {})


if __name__ == "__main__":
    sys.exit(main())
