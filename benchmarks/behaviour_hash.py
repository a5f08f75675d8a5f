"""Fingerprints of what runs produce, to show that a refactor changed no behaviour.

    python benchmarks/behaviour_hash.py [--cache DIR] [--output DIR] [--only NAME ...]

Runs, through the ``genstress`` command (whose interface a refactor keeps), the demo config (campaign,
oracle labels, correction) and reduced ``jobs/mnist_defuse.yaml``, ``jobs/mnist_mixing.yaml`` and
``jobs/mnist_kldb.yaml`` (campaign and oracle labels; smaller data, training and searches so the whole
script takes minutes on 2 cores). Models are trained once into ``--cache`` and reused, so two commits
run with the same cache compare on the same models. Prints, per run and stage, the row count and a
hash of the stage's rows sorted (every Parquet file of the stage folder; JSON results without their
timings), and writes them to ``benchmarks/results/behaviour_hash.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "behaviour_hash.json"
# Keys whose values depend on the machine's speed or the clock, not on behaviour.
VOLATILE = ("seconds", "time", "_at", "elapsed", "duration", "throughput", "versions", "host", "pid", "uri", "path")

SMALL_TRAIN = {"limit": 6000}
# The jobs' own models (on a third of the training split) and smaller searches.
REDUCED = {
    "mnist_defuse": {"data.search.limit": 400, "strategy.draws": 20, "reduce.samples_per_region": 20},
    "mnist_mixing": {"data.search.limit": 300, "strategy.seeds": 40, "strategy.budget_calls": 20,
                     "generator.train.epochs": 2},
    "mnist_kldb": {"data.search.limit": 300, "strategy.seeds": 30, "strategy.alphas": [0.0, 0.5, 1.0],
                   "strategy.betas": [3.0], "strategy.steps": 10, "generator.train.epochs": 2,
                   # A briefly trained DDPM rarely lands within 0.1 of the 4/9 boundary: a wider band
                   # gives regions, so region samples decode through the pixel model too.
                   "strategy.boundary_kldb": 2.0},
}


def _set(cfg: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        cfg = cfg.setdefault(key, {})
    cfg[last] = value


def reduced_config(name: str, folder: Path) -> Path:
    """``jobs/<name>.yaml`` with the REDUCED settings and a smaller training split, written to ``folder``."""
    cfg = yaml.safe_load((ROOT / "jobs" / f"{name}.yaml").read_text())
    for split in ("train", "validation"):
        cfg["data"][split].update(SMALL_TRAIN)
        cfg["data"][split]["uri"] = str((ROOT / cfg["data"][split]["uri"]).resolve())
    cfg["data"]["search"]["uri"] = str((ROOT / cfg["data"]["search"]["uri"]).resolve())
    for dotted, value in REDUCED[name].items():
        _set(cfg, dotted, value)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def genstress(*args: str, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "genstress_ray.cli", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def _canonical(value, run: str):
    """``value`` without what depends on the clock or the machine, with the run's own folder as
    ``<run>`` (results name the run's checkpoints by path)."""
    if isinstance(value, dict):
        return {k: _canonical(v, run) for k, v in sorted(value.items()) if not any(w in k for w in VOLATILE)}
    if isinstance(value, list):
        return [_canonical(v, run) for v in value]
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, str):
        return value.replace(run, "<run>")
    return value


def fingerprint(run: Path) -> dict[str, dict]:
    """Per stage folder of ``run``: rows and a hash of its sorted rows (and of its JSON results)."""
    prints = {}
    for folder in sorted({p.parent for p in run.rglob("*.parquet")} | {p.parent for p in run.rglob("results.json")}):
        rows = []
        for part in sorted(folder.glob("*.parquet")):
            rows += [json.dumps(_canonical(r, str(run)), sort_keys=True) for r in pq.read_table(part).to_pylist()]
        for result in sorted(folder.glob("*.json")):
            if result.name not in ("manifest.json",):
                rows.append(json.dumps(_canonical(json.loads(result.read_text()), str(run)), sort_keys=True))
        rows.sort()
        digest = hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]
        prints[str(folder.relative_to(run))] = {"rows": len(rows), "hash": digest}
    return prints


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "genstress-behaviour-cache"))
    parser.add_argument("--output", default=tempfile.mkdtemp(prefix="genstress-behaviour-"))
    parser.add_argument("--only", nargs="*", default=["demo", *REDUCED])
    parser.add_argument("--results", default=str(RESULTS), help="where the hashes are written")
    parser.add_argument("--existing", action="store_true",
                        help="fingerprint the runs already in --output (made by an earlier call) without running them")
    args = parser.parse_args()
    env = {**os.environ, "GENSTRESS_CACHE": args.cache}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    results = {"commit": commit, "runs": {}}
    for name in args.only:
        print(f"== {name}", flush=True)
        run = out / ("demo" if name == "demo" else name.replace("_", "-")) / "hash"
        if args.existing:
            pass
        elif name == "demo":
            genstress("demo", "--output", str(out), "--run-id", "hash", env=env)
        else:
            genstress("run", str(reduced_config(name, out)), "--output", str(out), "--run-id", "hash", env=env)
            if sum(pq.read_metadata(p).num_rows for p in (run / "regions").glob("*.parquet")):
                genstress("label", str(run), "--oracle", env=env)
        results["runs"][name] = fingerprint(run)
        for stage, fp in results["runs"][name].items():
            print(f"  {stage:40s} {fp['rows']:7d} rows  {fp['hash']}", flush=True)
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
