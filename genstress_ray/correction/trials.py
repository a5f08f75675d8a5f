"""The lambda sweep on Ray: each trial is a Ray Train ``TorchTrainer`` run, the trials a Ray Tune grid.

Tune runs as many trials at once as the cluster's resources allow (or ``max_concurrent_trials``);
each trial's trainer runs the fine-tune loop on ``workers`` DDP workers (gloo on CPUs, NCCL on GPUs).
With ``workers=0`` the trainers run in Ray Train's local mode, one after another in this process.
The data reaches the workers as Ray Data datasets (``correction.datasets``): D's ``train`` split is
streamed and split between the workers, Df and the evaluation sets are read whole. Worker rank 0
scores the model on every evaluation set and writes the fine-tuned weights and the trial's metrics
to the run's storage. One more trial, ``before``, only scores the classifier as it is.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import asdict, dataclass
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
import torch
from ray import train, tune
from ray.train import DataConfig
from ray.train.torch import TorchTrainer

from genstress_ray.correction.finetune import EVAL_SETS, Batch, FinetuneSettings, finetune, rate, score
from genstress_ray.models import ModelRef, load_classifier, load_module, save_checkpoint
from genstress_ray.pipeline import verbose
from genstress_ray.storage import filesystem_for, read_bytes, write_bytes_atomic

BEFORE = "before"  # the trial that fine-tunes nothing: the classifier's own scores
CHECKPOINT_FILE = "model"


@dataclass
class TrialResources:
    workers: int = 1
    num_cpus_per_worker: float = 0.5
    use_gpu: bool = False
    threads: int = 1
    max_concurrent_trials: int | None = None
    read_cpus: float = 0.25  # CPUs of each task that reads and decodes the trials' data

    def scaling(self) -> train.ScalingConfig:
        return train.ScalingConfig(num_workers=self.workers, use_gpu=self.use_gpu,
                                   resources_per_worker={"CPU": self.num_cpus_per_worker})


def save_finetuned(module: torch.nn.Module, ref: ModelRef, uri: str, meta: dict | None = None) -> ModelRef:
    """Write a fine-tuned classifier in the format it came in and return a reference that loads it.

    TorchScript stays TorchScript; a registered or factory-built module becomes safetensors that
    carry its architecture and params, like every checkpoint the project writes. ``meta`` is the
    original checkpoint's metadata when the caller already has it (else it is read again).
    """
    if isinstance(module, torch.jit.ScriptModule):
        buf = io.BytesIO()
        torch.jit.save(module, buf)
        fs, path = filesystem_for(uri)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        write_bytes_atomic(fs, path, buf.getvalue())
        return ModelRef(uri, "torchscript")
    if meta is None:
        _, meta = load_module(ref.uri, ref.format, ref.architecture, ref.factory, ref.params)
    architecture = ref.architecture or meta.get("architecture")
    params = {**meta.get("params", {}), **ref.params}
    save_checkpoint(module, uri, architecture, params)
    return ModelRef(uri, "safetensors", architecture, ref.factory, params)


def checkpoint_name(ref: ModelRef) -> str:
    return CHECKPOINT_FILE + (".pt" if ref.format == "torchscript" else ".safetensors")


def _batches(batches) -> Iterator[Batch]:
    return ((b["image"], b["label"], b["region"], b.get("target")) for b in batches)


def _whole(shard, image_shape) -> tuple[np.ndarray, np.ndarray]:
    """A small dataset (Df) read whole into the worker."""
    parts = list(shard.iter_batches(batch_size=4096, batch_format="numpy"))
    if not parts:
        return np.zeros((0, *image_shape), np.uint8), np.zeros(0, np.int64)
    return np.concatenate([p["image"] for p in parts]), np.concatenate([p["label"] for p in parts]).astype(np.int64)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: fine-tune on the ``train`` shard and Df, then (rank 0) score
    every evaluation set and write the weights and the metrics."""
    torch.set_num_threads(config["threads"])
    context = train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    ref = ModelRef(**config["model"])
    # The classifier behind its protocol: it makes the run's images into its network's input.
    classifier = load_classifier(ref, config["class_names"], config["image_shape"])
    device = ray.train.torch.get_device()  # the worker's GPU when use_gpu, else the CPU
    settings = FinetuneSettings(**config["settings"])
    if config["method"] != BEFORE:
        # DDP (gloo on CPUs, NCCL on GPUs) only where there is more than one rank to synchronise.
        model = ray.train.torch.prepare_model(classifier) if world > 1 or device.type == "cuda" else classifier.to(device)
        fine_x, fine_y = _whole(train.get_dataset_shard(config["fine"]), config["image_shape"])
        d = train.get_dataset_shard("train")

        def epoch(e: int):
            return _batches(d.iter_batches(batch_size=settings.batch_size, batch_format="numpy", drop_last=True,
                                           local_shuffle_buffer_size=settings.shuffle_rows,
                                           local_shuffle_seed=settings.seed + e))

        finetune(model, epoch, fine_x, fine_y, settings, rank, device)
    if rank == 0:
        classifier.to(device)
        scores = {name: score(classifier, _batches(train.get_dataset_shard(name).iter_batches(
            batch_size=1024, batch_format="numpy")), device) for name in config["eval_sets"]}
        metrics = {**{metric: rate(scores[name]) for metric, name in EVAL_SETS.items() if name in scores},
                   "lam": settings.lam, "method": config["method"], "checkpoint": config["checkpoint"],
                   "scores": scores}
        # Written straight to the run's storage (any fsspec URI): Ray Train's local mode keeps no
        # checkpoints and its results carry metrics only with one, so every mode leaves the weights
        # and the metrics in the same place.
        if config["method"] != BEFORE:
            save_finetuned(classifier.net.cpu(), ref, config["checkpoint"])
        fs, path = filesystem_for(_metrics_uri(config["checkpoint"]))
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        write_bytes_atomic(fs, path, json.dumps(metrics).encode())
    train.report({"method": config["method"]})


def _metrics_uri(checkpoint: str) -> str:
    return checkpoint.rsplit("/", 1)[0] + "/metrics.json"


def _checkpoint(base: dict[str, Any], trial: dict[str, Any]) -> str:
    name = BEFORE if trial["method"] == BEFORE else f"{trial['method']}-lam{trial['index']:02d}"
    return f"{base['checkpoint_root']}/{name}/{checkpoint_name(ModelRef(**base['loop']['model']))}"


def fit_trial(base: dict[str, Any], trial: dict[str, Any]) -> None:
    """One TorchTrainer run for one (method, lambda index), or the ``before`` scoring."""
    method = trial["method"]
    resources = TrialResources(**base["resources"])
    datasets = {name: base["datasets"][name] for name in base["loop"]["eval_sets"]}
    lam = None
    if method != BEFORE:
        fine = base["fine_sets"][method]
        datasets.update(train=base["datasets"]["train"], **{fine: base["datasets"][fine]})
        lam = base["lambdas"][trial["index"]]
    checkpoint = _checkpoint(base, trial)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={**base["loop"], "method": method, "fine": base["fine_sets"].get(method),
                           "settings": {**base["settings"], "lam": lam}, "checkpoint": checkpoint},
        scaling_config=resources.scaling(),
        run_config=train.RunConfig(name=checkpoint.rsplit("/", 2)[1], storage_path=base["ray_storage"]),
        datasets=datasets, dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    trainer.fit()


def _trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """One Tune trial = one TorchTrainer run."""
    fit_trial(base, config["trial"])
    tune.report({"method": config["trial"]["method"]})


def run_trials(datasets: dict[str, ray.data.Dataset], model: ModelRef, class_names: list[str], image_shape,
               fine_sets: dict[str, str], lambdas: list[float], settings: FinetuneSettings,
               resources: TrialResources, checkpoint_root: str) -> list[dict[str, Any]]:
    """Score the classifier (the ``before`` row) and fine-tune it once per (method, lambda), in parallel
    as resources allow; one metrics dict per trial.

    ``datasets`` holds D's ``train`` split, each method's Df (``fine_sets`` maps a method to its
    dataset's name: ``{"defuse": "finetune"}``) and the evaluation sets (``EVAL_SETS``) to score;
    each trial's weights go to ``<checkpoint_root>/<method>-lam<i>/`` (any fsspec URI), named in its
    ``checkpoint`` metric, and its ``scores`` hold its correct counts per set and region.
    """
    eval_sets = [name for name in EVAL_SETS.values() if name in datasets]
    base = {
        "datasets": datasets,
        "loop": {"model": asdict(model), "threads": resources.threads, "class_names": list(class_names),
                 "image_shape": tuple(image_shape), "eval_sets": eval_sets},
        "settings": {k: v for k, v in asdict(settings).items() if k != "lam"},
        "lambdas": list(lambdas), "fine_sets": fine_sets, "resources": asdict(resources),
        "checkpoint_root": checkpoint_root.rstrip("/"),
        # Ray's own run records (no checkpoints go there) stay on this machine.
        "ray_storage": tempfile.mkdtemp(prefix="genstress-train-"),
    }
    trials = [{"method": BEFORE, "index": 0}] + [{"method": m, "index": i} for m in fine_sets for i in range(len(lambdas))]
    if resources.workers == 0:
        # Ray Train's local mode runs the loop in this process; Ray refuses it inside a Tune trial,
        # so local-mode trials run here one after another.
        for trial in trials:
            fit_trial(base, trial)
    else:
        # A trial only waits on its trainer, whose workers hold the CPUs (Tune refuses exactly 0).
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_trial, base=base), {"cpu": 0.01}),
            param_space={"trial": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(max_concurrent_trials=resources.max_concurrent_trials
                                        or _max_concurrent(resources)),
            run_config=tune.RunConfig(name="lambda-sweep", storage_path=tempfile.mkdtemp(prefix="genstress-tune-"),
                                      verbose=1 if verbose() else 0),
        )
        for result in tuner.fit():
            # A trial Tune never started has no config.
            trial = (result.config or {}).get("trial")
            if result.error is not None:
                raise RuntimeError(f"correction trial {trial} failed") from result.error
            if "method" not in (result.metrics or {}):
                # Tune takes Ctrl-C itself and returns the trials it stopped, unreported: an interrupt.
                raise KeyboardInterrupt(f"correction trial {trial} was stopped before it reported")
    rows = [json.loads(read_bytes(_metrics_uri(_checkpoint(base, t)))) for t in trials]
    rows = [{k: v for k, v in row.items() if k in _TRIAL_KEYS} for row in rows]
    return rows[:1] + sorted(rows[1:], key=lambda r: (r["method"], r["lam"]))


# A trial's row: its method and lambda, every evaluation set's accuracy (``EVAL_SETS``), its weights
# and its correct counts.
_TRIAL_KEYS = ("method", "lam", *EVAL_SETS, "checkpoint", "scores")


def _max_concurrent(resources: TrialResources) -> int:
    # The trials' data is read by tasks beside them: leave them room, or every trial waits on a read
    # that cannot be scheduled.
    cpus = ray.cluster_resources().get("CPU", 1) - 2 * resources.read_cpus
    per_trial = resources.workers * resources.num_cpus_per_worker
    return max(1, int(cpus // per_trial))
