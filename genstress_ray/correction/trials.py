"""The lambda sweep on Ray: each trial is a Ray Train ``TorchTrainer`` run, the trials a Ray Tune grid.

Tune runs as many trials at once as the cluster's resources allow (or ``max_concurrent_trials``);
each trial's trainer runs the fine-tune loop on ``workers`` DDP workers (gloo on CPUs, NCCL on GPUs).
With ``workers=0`` the trainers run in Ray Train's local mode, one after another in this process.
Worker rank 0 writes the fine-tuned weights and the trial's metrics to the run's storage.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray import train, tune
from ray.train.torch import TorchTrainer

from genstress_ray.correction.finetune import EVAL_SETS, FinetuneSettings, evaluate, finetune
from genstress_ray.models import ModelRef, load_module, save_checkpoint
from genstress_ray.pipeline import verbose
from genstress_ray.storage import filesystem_for, read_bytes, write_bytes_atomic

CHECKPOINT_FILE = "model"


@dataclass
class TrialResources:
    workers: int = 1
    num_cpus_per_worker: float = 0.5
    use_gpu: bool = False
    threads: int = 1
    max_concurrent_trials: int | None = None

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


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: fine-tune, evaluate, report metrics and (rank 0) the weights."""
    torch.set_num_threads(config["threads"])
    context = train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    data = ray.get(config["data"][0])
    ref = ModelRef(**config["model"])
    net, meta = load_module(ref.uri, ref.format, ref.architecture, ref.factory, ref.params)
    device = ray.train.torch.get_device()  # the worker's GPU when use_gpu, else the CPU
    # DDP (gloo on CPUs, NCCL on GPUs) only where there is more than one rank to synchronise.
    model = ray.train.torch.prepare_model(net) if world > 1 or device.type == "cuda" else net.to(device)
    settings = FinetuneSettings(**config["settings"])
    finetune(model, data, config["fine"], settings, rank, world, device)
    metrics = {**evaluate(net, data, device), "lam": settings.lam, "method": config["method"],
               "checkpoint": config["checkpoint"]}
    if rank == 0:
        # Written straight to the run's storage (any fsspec URI): Ray Train's local mode keeps no
        # checkpoints and its results carry metrics only with one, so every mode leaves the weights
        # and the metrics in the same place.
        save_finetuned(net.cpu(), ref, config["checkpoint"], meta)
        fs, path = filesystem_for(_metrics_uri(config["checkpoint"]))
        write_bytes_atomic(fs, path, json.dumps(metrics).encode())
    train.report(metrics)


def _metrics_uri(checkpoint: str) -> str:
    return checkpoint.rsplit("/", 1)[0] + "/metrics.json"


def fit_trial(base: dict[str, Any], method: str, index: int) -> dict[str, Any]:
    """One TorchTrainer run for one (method, lambda); returns its metrics and checkpoint location."""
    resources = TrialResources(**base["resources"])
    name = f"{method}-lam{index:02d}"
    checkpoint = f"{base['checkpoint_root']}/{name}/{checkpoint_name(ModelRef(**base['loop']['model']))}"
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={**base["loop"], "method": method, "fine": base["fine_sets"][method],
                           "settings": {**base["settings"], "lam": base["lambdas"][index]}, "checkpoint": checkpoint},
        scaling_config=resources.scaling(),
        run_config=train.RunConfig(name=name, storage_path=base["ray_storage"]),
    )
    trainer.fit()
    return json.loads(read_bytes(_metrics_uri(checkpoint)))


def _trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """One Tune trial = one TorchTrainer run."""
    tune.report(fit_trial(base, config["method"], config["index"]))


def run_trials(data: dict[str, np.ndarray], model: ModelRef, fine_sets: dict[str, str], lambdas: list[float],
               settings: FinetuneSettings, resources: TrialResources, checkpoint_root: str) -> list[dict[str, Any]]:
    """Fine-tune once per (method, lambda), in parallel as resources allow; one metrics dict per trial.

    ``fine_sets`` maps a method name to the key of its Df arrays in ``data`` (``{"defuse": "finetune"}``);
    each trial's weights go to ``<checkpoint_root>/<method>-lam<i>/`` (any fsspec URI), named in its
    ``checkpoint`` metric.
    """
    data_ref = ray.put(data)
    base = {
        "loop": {"data": [data_ref], "model": asdict(model), "threads": resources.threads},
        "settings": {k: v for k, v in asdict(settings).items() if k != "lam"},
        "lambdas": list(lambdas), "fine_sets": fine_sets, "resources": asdict(resources),
        "checkpoint_root": checkpoint_root.rstrip("/"),
        # Ray's own run records (no checkpoints go there) stay on this machine.
        "ray_storage": tempfile.mkdtemp(prefix="genstress-train-"),
    }
    if resources.workers == 0:
        # Ray Train's local mode runs the loop in this process; Ray refuses it inside a Tune trial,
        # so local-mode trials run here one after another.
        rows = [fit_trial(base, method, i) for method in fine_sets for i in range(len(lambdas))]
    else:
        # A trial only waits on its trainer, whose workers hold the CPUs (Tune refuses exactly 0).
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_trial, base=base), {"cpu": 0.01}),
            param_space={"method": tune.grid_search(list(fine_sets)),
                         "index": tune.grid_search(list(range(len(lambdas))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=resources.max_concurrent_trials
                                        or _max_concurrent(resources)),
            run_config=tune.RunConfig(name="lambda-sweep", storage_path=tempfile.mkdtemp(prefix="genstress-tune-"),
                                      verbose=1 if verbose() else 0),
        )
        rows = []
        for result in tuner.fit():
            if result.error is not None:
                raise RuntimeError(f"correction trial {result.config} failed: {result.error}")
            if "method" not in (result.metrics or {}):
                # Tune takes Ctrl-C itself and returns the trials it stopped, unreported: an interrupt.
                raise KeyboardInterrupt(f"correction trial {result.config} was stopped before it reported")
            rows.append(result.metrics)
    rows = [{k: v for k, v in row.items() if k in _TRIAL_KEYS} for row in rows]
    return sorted(rows, key=lambda r: (r["method"], r["lam"]))


# A trial's row: its method and lambda, every evaluation set's accuracy (``EVAL_SETS``), its weights.
_TRIAL_KEYS = ("method", "lam", *EVAL_SETS, "checkpoint")


def _max_concurrent(resources: TrialResources) -> int:
    cpus = ray.cluster_resources().get("CPU", 1)
    per_trial = resources.workers * resources.num_cpus_per_worker
    return max(1, int(cpus // per_trial))
