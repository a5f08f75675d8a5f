"""Identification throughput: the Ray Data pipeline against a plain single-process torch loop.

Both sides do the same work on the same cores with the same trained MNIST VAE + CNN: encode, Beta
noise, decode, classify, keep the k least-perturbed faults, PNG-encode them and write Parquet. The plain
loop calls the very ``DefuseSearch`` class the Ray actors use, batch after batch, in this process.

Each side first picks its own best setting in a short calibration sweep (batch size, and for the
pipeline the actor/thread split), then both run alternately ``--reps`` times at N candidates; the
ratio of rates is taken per repetition and the median is reported. Driver peak memory is measured in
fresh subprocesses at N and ``--scale`` x N candidates; the 10N pipeline run is paired with one
plain run at 10N for a second ratio (the pipeline's rate includes starting its actor process).

    python benchmarks/identify_throughput.py            # N = 1,000 images x 100 draws = 100,000 candidates
    python benchmarks/identify_throughput.py --images 200 --reps 1   # a quick look

Writes benchmarks/results/identify_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "identify_throughput.json"
JOB = ROOT / "jobs" / "mnist_defuse.yaml"


def campaign_config(images: int, draws: int, batch_size: int, actors: int, threads: int, chunk: int, output: str) -> dict:
    from genstress_ray.config import load_config

    cfg = load_config(JOB).model_dump()
    cfg["data"]["search"]["limit"] = images
    cfg["strategy"].update(draws=draws)
    cfg["output"] = output
    cfg["resources"]["search"] = {"actors": actors, "num_cpus": 0.5, "threads": threads,
                                  "batch_size": batch_size, "chunk_size": chunk}
    return cfg


def prepared(cfg: dict):
    """Search images and the trained (cached) model references, as the pipeline prepares them."""
    from genstress_ray.config import load_config
    from genstress_ray.context import load_split, prepare_model

    c = load_config(cfg)
    search = load_split(c.data.search)
    refs = {role: prepare_model(role, spec, c, search.class_names, search.image_shape) for role, spec in
            (("classifier", c.classifier), ("generator", c.generator))}
    return c, search, refs


def plain_loop(cfg: dict, threads: int, batch_size: int, chunk: int, out_dir: str) -> float:
    """Candidates per second of the same stage code run in a plain loop in this process."""
    import torch

    from genstress_ray.stages import DefuseSearch

    c, search, refs = prepared(cfg)
    t0 = time.perf_counter()
    stage = DefuseSearch(refs["classifier"], refs["generator"], search.class_names, search.image_shape, c.seed,
                         threads=threads, chunk_size=chunk, params=c.strategy.model_dump())
    flat = search.images.reshape(len(search), -1)
    tables = []
    for i in range(0, len(search), batch_size):
        batch = {"source_id": search.source_ids[i: i + batch_size], "source_label": search.labels[i: i + batch_size],
                 "image": [row.tobytes() for row in flat[i: i + batch_size]]}
        tables.append(stage.run_batch(batch))
    pq.write_table(pa.concat_tables(tables), f"{out_dir}/plain.parquet")
    elapsed = time.perf_counter() - t0
    torch.set_num_threads(2)
    return len(search) * c.strategy.draws / elapsed


def pipeline(cfg: dict, run_id: str) -> float:
    """Candidates per second of the identify stage of ``run_campaign`` (actor start-up included)."""
    from genstress_ray.pipeline import run_campaign

    result = run_campaign(cfg, run_id=run_id, stop_after="identify")
    manifest = json.loads((Path(result.run_uri) / "manifest.json").read_text())
    return result.counts["candidates"] / manifest["timings"]["identify"]


def peak_rss(fn):
    """(fn(), this process's peak resident memory while it ran in MiB, sampled every 20 ms)."""
    import threading

    import psutil

    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        return fn(), peak[0] / 2 ** 20
    finally:
        done.set()
        thread.join()


def memory_child(images: int, draws: int, batch_size: int, actors: int, threads: int, chunk: int) -> None:
    """Run one pipeline in this fresh process and print the driver's resident memory: before the run
    (after imports and ray.init) and its peak during the run, sampled every 20 ms."""
    import psutil
    import ray

    from genstress_ray.pipeline import run_campaign

    with tempfile.TemporaryDirectory() as tmp:
        cfg = campaign_config(images, draws, batch_size, actors, threads, chunk, tmp)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        before = psutil.Process().memory_info().rss
        result, peak = peak_rss(lambda: run_campaign(cfg, run_id="mem", stop_after="identify"))
        manifest = json.loads((Path(result.run_uri) / "manifest.json").read_text())
        print(json.dumps({"candidates": result.counts["candidates"],
                          "pipeline_rate": result.counts["candidates"] / manifest["timings"]["identify"],
                          "rss_before_mib": before / 2 ** 20,
                          "peak_rss_during_run_mib": peak,
                          "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=512)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.memory_child:
        memory_child(args.images, args.draws, args.batch_size, args.actors, args.threads, args.chunk)
        return

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    work = tempfile.mkdtemp(prefix="genstress-bench-")
    cal_images = max(100, args.images // 5)
    # Calibration: each side at its own best setting (small run, one repetition each).
    plain_grid = [(bs, ch) for bs in (64, 256) for ch in (128, 512)]
    plain_cal = {f"batch{bs}-chunk{ch}": plain_loop(campaign_config(cal_images, args.draws, bs, 1, 2, ch, work), 2, bs, ch, work)
                 for bs, ch in plain_grid}
    pipe_grid = [(bs, a, t, ch) for bs in (64, 256) for (a, t) in ((1, 2), (2, 1)) for ch in (128,)]
    pipe_cal = {}
    for i, (bs, a, t, ch) in enumerate(pipe_grid):
        pipe_cal[f"batch{bs}-actors{a}-threads{t}-chunk{ch}"] = pipeline(
            campaign_config(cal_images, args.draws, bs, a, t, ch, work), f"cal{i}")
    best_plain = plain_grid[max(range(len(plain_grid)), key=lambda i: list(plain_cal.values())[i])]
    best_pipe = pipe_grid[max(range(len(pipe_grid)), key=lambda i: list(pipe_cal.values())[i])]
    print("calibration plain:", plain_cal, "\ncalibration pipeline:", pipe_cal, flush=True)

    plain_rates, pipe_rates = [], []
    for rep in range(args.reps):
        bs, ch = best_plain
        plain_rates.append(plain_loop(campaign_config(args.images, args.draws, bs, 1, 2, ch, work), 2, bs, ch, work))
        bs, a, t, ch = best_pipe
        pipe_rates.append(pipeline(campaign_config(args.images, args.draws, bs, a, t, ch, work), f"rep{rep}"))
        print(f"rep {rep}: plain {plain_rates[-1]:.0f}/s pipeline {pipe_rates[-1]:.0f}/s", flush=True)
    ratios = [p / q for p, q in zip(pipe_rates, plain_rates)]
    ray.shutdown()

    memory = {}
    bs, a, t, ch = best_pipe
    for label, images in (("N", args.images), ("10N", args.images * args.scale)):
        proc = subprocess.run([sys.executable, __file__, "--memory-child", "--images", str(images),
                               "--draws", str(args.draws), "--batch-size", str(bs), "--actors", str(a),
                               "--threads", str(t), "--chunk", str(ch)],
                              capture_output=True, text=True, check=True)
        memory[label] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"memory {label}: {memory[label]}", flush=True)
    # One side-by-side pair at 10N: the actor's fixed start-up weighs less on a longer run.
    bs, ch = best_plain
    plain_10n = plain_loop(campaign_config(args.images * args.scale, args.draws, bs, 1, 2, ch, work), 2, bs, ch, work)
    print(f"10N: plain {plain_10n:.0f}/s pipeline {memory['10N']['pipeline_rate']:.0f}/s", flush=True)

    result = {
        "benchmark": "identify_throughput",
        "command": " ".join(["python", "benchmarks/identify_throughput.py", *sys.argv[1:]]),
        "machine": {"cpus": 2, "platform": platform.platform(), "python": platform.python_version()},
        "candidates_per_rep": args.images * args.draws,
        "plain_best": {"batch_size": best_plain[0], "chunk_size": best_plain[1], "threads": 2},
        "pipeline_best": dict(zip(("batch_size", "actors", "threads", "chunk_size"), best_pipe)),
        "calibration": {"plain": plain_cal, "pipeline": pipe_cal},
        "plain_rates": plain_rates, "pipeline_rates": pipe_rates, "ratios": ratios,
        "ratio": statistics.median(ratios),
        "ratio_10N_single_pair": memory["10N"]["pipeline_rate"] / plain_10n,
        "plain_rate_10N": plain_10n,
        "memory": memory,
        "memory_ratio_10N_vs_N": memory["10N"]["peak_rss_during_run_mib"] / memory["N"]["peak_rss_during_run_mib"],
        "targets": {"ratio": ">= 0.8 at N >= 100,000", "memory_ratio_10N_vs_N": "<= 1.2"},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("ratio", "ratio_10N_single_pair", "memory_ratio_10N_vs_N",
                                             "plain_rates", "pipeline_rates")}, indent=2))


if __name__ == "__main__":
    main()
