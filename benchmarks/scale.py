"""Memory and speed at scale: Defuse over an image folder of 224x224 RGB JPEGs, at N and 10N images.

The folder is made here from GTSRB (half of it is searched, by a seeded hash of each path) (each image upscaled to 224x224, JPEG quality 90, classes cycled).
The models are the real GTSRB classifier and beta-VAE of benchmarks/gtsrb_defuse.py (35x35): the actor
resizes each 224x224 image to the VAE's 35x35, and its decodes back, and the classifier's input spec
makes the run's images into its own. So every candidate pays what a run at another resolution pays.

Measured, each in a fresh subprocess: the driver's peak RSS (sampled every 20 ms) and the identify
stage's candidates/s (its wall time, actor start-up included) at N and 10N; and, at 10N, a plain
single-process loop doing the same work on the same cores (list files, read and decode the JPEGs, the
very DefuseSearch code in batches, write Parquet) side by side with the pipeline.

    python benchmarks/scale.py [--images 400] [--draws 20]

Writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from identify_throughput import peak_rss  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
GTSRB = (ROOT / ".." / "shared" / "data" / "gtsrb" / "images").resolve()
MODELS = ROOT / "genstress-models"


def make_folder(root: Path, n: int) -> Path:
    """``n`` 224x224 RGB JPEGs in class folders, upscaled from GTSRB (made once per ``n``)."""
    from PIL import Image

    folder = root / f"jpeg224-{n}"
    if (folder / "_DONE").exists():
        return folder
    sources = sorted(GTSRB.rglob("*.png"))
    for i in range(n):
        src = sources[(i * 7919) % len(sources)]  # a stride through every class
        out = folder / src.parent.name / f"{i:07d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(src).convert("RGB").resize((224, 224), Image.BICUBIC).save(out, quality=90)
    (folder / "_DONE").write_text(str(n))
    return folder


def config(folder: Path, draws: int, output: str) -> dict:
    return {"campaign": "scale", "output": output, "shard_rows": 128,
            # Half the folder is searched (a seeded hash of each path); the other half stays held out.
            "data": {"search": {"kind": "image_folder", "uri": str(folder), "split": "test", "test_fraction": 1.0,
                                "validation_fraction": 0.0, "share": [0.0, 0.5], "options": {"mode": "RGB"}}},
            "classifier": {"uri": str(MODELS / "gtsrb-classifier.safetensors")},
            "generator": {"uri": str(MODELS / "gtsrb-vae.safetensors")},
            "strategy": {"name": "defuse", "a": 75, "b": 75, "draws": draws, "centred": True},
            "resources": {"search": {"actors": 1, "num_cpus": 0.5, "threads": 2, "batch_size": 64,
                                     "chunk_size": 128, "read_cpus": 0.5}}}


def pipeline_child(folder: str, draws: int) -> None:
    import ray

    from genstress_ray.pipeline import run_campaign

    with tempfile.TemporaryDirectory() as out:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        cfg = config(Path(folder), draws, out)
        result, peak = peak_rss(lambda: run_campaign(cfg, run_id="scale", stop_after="identify"))
        manifest = json.loads((Path(result.run_uri) / "manifest.json").read_text())
        seconds = manifest["timings"]["identify"]
        print(json.dumps({"candidates": result.counts["candidates"], "seconds": seconds,
                          "rate": result.counts["candidates"] / seconds, "driver_peak_rss_mib": peak}))
        ray.shutdown()


def plain_child(folder: str, draws: int) -> None:
    """The same work in one process: list, read and decode the JPEGs, DefuseSearch in batches, Parquet."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from genstress_ray.config import load_config
    from genstress_ray.data import get_source
    from genstress_ray.data.streaming import decode_fitted
    from genstress_ray.models import ModelRef
    from genstress_ray.stages import DefuseSearch

    with tempfile.TemporaryDirectory() as out:
        c = load_config(config(Path(folder), draws, out))
        torch.set_num_threads(c.resources.search.threads)
        t0 = time.perf_counter()
        source = get_source("image_folder", **c.data.search.source_params())
        index, catalog = source.index(), source.catalog()
        stage = DefuseSearch(ModelRef(c.classifier.uri), ModelRef(c.generator.uri), catalog.class_names,
                             catalog.image_shape, c.seed, threads=c.resources.search.threads,
                             chunk_size=c.resources.search.chunk_size, params=c.strategy.model_dump())
        keys, labels, tables = index["key"].to_pylist(), index["label"].to_numpy(), []
        size = c.resources.search.batch_size
        for i in range(0, len(keys), size):
            pixels = [decode_fitted((Path(folder) / k).read_bytes(), "RGB", None, None).tobytes() for k in keys[i: i + size]]
            batch = {"source_id": np.asarray([f"image_folder:test:{k}" for k in keys[i: i + size]], object),
                     "source_label": labels[i: i + size], "image": np.asarray(pixels, object)}
            tables.append(stage.run_batch(batch))
        buf = io.BytesIO()
        pq.write_table(pa.concat_tables(tables), buf)
        seconds = time.perf_counter() - t0
        print(json.dumps({"candidates": len(keys) * draws, "seconds": seconds, "rate": len(keys) * draws / seconds}))


def child(kind: str, folder: Path, draws: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, f"--{kind}-child", str(folder), "--draws", str(draws)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="N")
    parser.add_argument("--draws", type=int, default=20, help="Q, noise draws per image")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "genstress-scale"))
    parser.add_argument("--pipeline-child", help=argparse.SUPPRESS)
    parser.add_argument("--plain-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pipeline_child:
        pipeline_child(args.pipeline_child, args.draws)
        return 0
    if args.plain_child:
        plain_child(args.plain_child, args.draws)
        return 0
    missing = [p for p in ("gtsrb-classifier.safetensors", "gtsrb-vae.safetensors") if not (MODELS / p).exists()]
    if missing:
        raise SystemExit(f"first train the GTSRB models: python benchmarks/gtsrb_defuse.py (missing {missing})")
    work = Path(args.work)
    small, large = make_folder(work, args.images), make_folder(work, 10 * args.images)
    runs = {"N": child("pipeline", small, args.draws)}
    print("N:", runs["N"], flush=True)
    runs["10N"] = child("pipeline", large, args.draws)
    print("10N:", runs["10N"], flush=True)
    runs["plain_10N"] = child("plain", large, args.draws)
    print("plain 10N:", runs["plain_10N"], flush=True)
    result = {
        "benchmark": "scale", "command": " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]]),
        "machine": {"cpus": 2, "platform": platform.platform(), "python": platform.python_version()},
        "images": {"N": args.images, "10N": 10 * args.images}, "draws": args.draws, "image_side": 224,
        "models": "GTSRB small_cnn + beta_vae (35x35, benchmarks/gtsrb_defuse.py)", "runs": runs,
        "driver_rss_ratio_10N_vs_N": runs["10N"]["driver_peak_rss_mib"] / runs["N"]["driver_peak_rss_mib"],
        "throughput_ratio_10N_vs_N": runs["10N"]["rate"] / runs["N"]["rate"],
        "pipeline_vs_plain_10N": runs["10N"]["rate"] / runs["plain_10N"]["rate"],
        "candidates_per_second_per_core_10N": runs["10N"]["rate"] / 2,
        "targets": {"driver_rss_ratio_10N_vs_N": "<= 1.2", "throughput_ratio_10N_vs_N": "0.9 .. 1.1",
                    "pipeline_vs_plain_10N": ">= 0.9"},
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.endswith(("N", "10N_vs_N"))}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
