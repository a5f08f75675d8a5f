"""Build and run a campaign: identify (Ray Data) -> regions (DP-GMM) -> region samples (Ray Data).

Every stage writes under ``<output>/<campaign>/<run_id>/<stage>/`` and finishes with a completion
marker. Rerunning a run id skips finished stages; the Ray stages (identify, region samples) are written
shard by shard, and an unfinished one computes only its missing shards (``stages.shards``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
import yaml

from genstress_ray.cleanup import watch_started_processes
from genstress_ray.config import CampaignConfig, ConfigError, load_config
from genstress_ray.context import RunContext, check_disjoint
from genstress_ray.data import DataError, slice_shards
from genstress_ray.guardrails import fidelity_line, generator_fidelity
from genstress_ray.lease import RunLease
from genstress_ray.models import ModelError
from genstress_ray.progress import Progress
from genstress_ray.regions import fit_regions, region_pairs, sample_regions
from genstress_ray.registry import resolve
from genstress_ray.runs import config_fingerprint, manifest_config, refuse_differences
from genstress_ray.stages import RegionDecode, run_sharded
from genstress_ray.storage import STAGES, RunStore, StageError, StorageError, library_versions

log = logging.getLogger(__name__)
# Errors in what the user gave (named, raised before or between stages); anything else a stage raises
# becomes a StageError.
USER_ERRORS = (ConfigError, DataError, ModelError, StorageError)


@dataclass
class CampaignResult:
    """What a campaign produced: where the run lives and how many rows each stage wrote."""

    run_uri: str
    run_id: str
    counts: dict[str, Any]
    regions: list[dict[str, Any]]
    class_names: list[str]
    skipped: list[str] = field(default_factory=list)
    message: str = ""
    fidelity: dict | None = None

    def summary(self) -> str:
        c = self.counts
        rate = c.get("faults", 0) / c["candidates"] if c.get("candidates") else 0.0
        lines = [f"run: {self.run_uri}", fidelity_line(self.fidelity),
                 f"candidates {c.get('candidates', 0)}, faults {c.get('faults', 0)} (fault rate {rate:.2%}), "
                 f"samples rows {c.get('samples', 0)}, non-finite dropped {c.get('nonfinite_dropped', 0)}",
                 f"regions: {len(self.regions)}" + (f" ({self.message})" if self.message else "")]
        for r in self.regions:
            lines.append(f"  region {r['region_id']}: weight {r['weight']:.3f}, {r['n_members']} faults, "
                         f"{region_pairs(r, self.class_names)}")
        if c.get("unreadable"):
            lines.append(f"skipped {c['unreadable']} unreadable image(s): {'; '.join(c.get('unreadable_first', []))}")
        if self.skipped:
            lines.append(f"resumed: skipped finished stages {', '.join(self.skipped)}")
        return "\n".join(lines)


def verbose() -> bool:
    """Whether Ray's own output (progress bars, worker logs, info lines) is shown: ``genstress -v``."""
    return os.environ.get("GENSTRESS_VERBOSE", "1") == "1"


def init_ray(cfg: CampaignConfig) -> None:
    """Start (or join, with ``ray.address``) Ray; quiet unless ``verbose()``: our own progress lines
    replace Ray Data's progress bars, and Ray's info lines stay in its log files."""
    if ray.is_initialized():
        return
    loud = verbose()
    level = logging.INFO if loud else logging.ERROR
    if not loud:
        # Read when Ray starts or runs a dataset. The C++ core's error-level note that actor
        # constructor arguments live in the object store is no error of ours.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy reporter prints nothing at verbose 0
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", _quiet_ray_data_logging())
        # Ray Data reads that config when it is first imported; if Ray Train imported it already,
        # quieten the console handlers it made (its log file keeps everything).
        for handler in logging.getLogger("ray.data").handlers:
            if getattr(handler, "stream", None) in (sys.stderr, sys.stdout):
                handler.setLevel(logging.CRITICAL)
    # Ray installs its own SIGTERM handler on the driver (it prints and exits 15); the command's own
    # (end like Ctrl-C: lease released, resume command printed) is put back.
    on_sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    with contextlib.nullcontext() if loud else _stderr_silenced():
        ray.init(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory,
                 include_dashboard=False, log_to_driver=loud, logging_level=level)
    if on_sigterm is not None:
        signal.signal(signal.SIGTERM, on_sigterm)
    for name in ("ray", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(level)
    ray.data.DataContext.get_current().enable_progress_bars = loud
    watch_started_processes(ray.get_runtime_context().get_node_id())  # a SIGKILLed driver cannot shut Ray down: a watchdog ends what it started


@contextlib.contextmanager
def _stderr_silenced():
    """Ray's start-up notes (its C++ core announcing its log level, the token-auth notice) go to
    file descriptor 2 directly; failures still surface as exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _quiet_ray_data_logging() -> str:
    """A Ray Data logging config (RAY_DATA_LOGGING_CONFIG) that keeps its log file and prints nothing."""
    path = os.path.join(tempfile.gettempdir(), "genstress-ray-data-logging.yaml")
    config = {"formatters": {"ray": {"format": "%(asctime)s %(levelname)s %(filename)s:%(lineno)s -- %(message)s"}},
              "handlers": {"file": {"class": "ray.data._internal.logging.SessionFileHandler", "formatter": "ray",
                                    "filename": "ray-data.log"},
                           # Failures reach the user once, as the stage's error line, not as Ray's traceback.
                           "console": {"class": "logging.StreamHandler", "formatter": "ray", "level": "CRITICAL"}},
              "loggers": {"ray.data": {"level": "DEBUG", "handlers": ["file", "console"], "propagate": False}}}
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def run_identify(ctx: RunContext, generator, constructor: dict, progress=None) -> dict:
    """The search, shard by shard, into ``identify``: the search images (read by Ray tasks for a
    streaming source) or the strategy's own source rows (seeds, sweep points)."""
    cfg, store = ctx.cfg, ctx.store
    if ctx.strategy.prepare is not None:
        resolve(ctx.strategy.prepare)(ctx, constructor, progress)
    store.resume_stage("identify")
    source = None
    if ctx.strategy.source_rows is None:
        source = ctx.search_source
        shards = source.shards(cfg.shard_rows)
        source = source if source.streaming else None
    else:
        shards = slice_shards(ctx.strategy.source_rows(cfg.strategy, ctx.catalog, generator), cfg.shard_rows)
    totals = run_sharded(store, "identify", shards, resolve(ctx.strategy.stage), cfg.resources.search,
                         {**constructor, "params": cfg.strategy.model_dump()}, source, progress)
    totals["samples"] = store.count_rows("identify")
    return totals


def run_regions(cfg: CampaignConfig, store: RunStore) -> dict:
    store.begin_stage("regions")
    faults = store.read_table("identify", columns=["latent", "source_label", "pred"], filter=pc.field("fault"))
    n = faults.num_rows
    latents = faults["latent"].combine_chunks().flatten().to_numpy().reshape(n, -1) if n else np.zeros((0, 0))
    r = cfg.reduce
    fit = fit_regions(latents, faults["source_label"].to_numpy(), faults["pred"].to_numpy(),
                      max_components=r.max_components,
                      weight_threshold=r.weight_threshold, max_points=r.max_faults, seed=cfg.seed,
                      max_iter=r.max_iter, max_dims=r.max_dims)
    if fit.message:
        log.warning("regions: %s", fit.message)
    store.write_table("regions", fit.table)
    return {"regions": fit.table.num_rows, "faults_fitted": fit.n_fitted, "components": fit.components,
            "converged": fit.converged, "message": fit.message}


def decode_region_samples(cfg: CampaignConfig, store: RunStore, stage: str, regions: pa.Table, per_region: int,
                          labels: dict[int, int], constructor: dict, progress=None,
                          anchors: Callable[[np.ndarray, np.ndarray], dict] | None = None) -> dict:
    """Draw ``per_region`` latents from each region, decode and classify them on Ray into ``stage``.

    ``labels`` maps a region id to the class its samples are judged against (a fault is a prediction
    other than it); ``constructor["seed"]`` seeds the draws. ``anchors``: ``(source labels, latents) ->
    columns`` that each sample is also scored against (``segmentation_anchors``).
    """
    region_ids, latents = sample_regions(regions, per_region, cfg.reduce.tau, constructor["seed"])
    source_labels = np.asarray([labels[r] for r in region_ids], np.int64)
    table = pa.table({"region_id": region_ids, "draw": np.tile(np.arange(per_region), regions.num_rows),
                      "source_label": source_labels, "latent": list(latents),
                      **(anchors(source_labels, latents) if anchors is not None and len(latents) else {})})
    totals = run_sharded(store, stage, slice_shards(table, cfg.shard_rows), RegionDecode,
                         cfg.resources.region_samples, constructor, progress=progress)
    return {stage: store.count_rows(stage), **totals}


def segmentation_anchors(ctx: RunContext, labels: np.ndarray, latents: np.ndarray) -> dict:
    """What a segmentation model's region samples are scored against: a sample has no source image,
    so it takes its **anchor**, the fault nearest to it in latent space (on at most
    ``reduce.max_dims`` principal components) among those of its class, and that fault's source
    image and mask (the layout the sample was drawn near). Columns ``anchor_id``, ``anchor_image``
    (raw uint8 bytes) and ``mask``."""
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    faults = ctx.store.read_table("identify", columns=["source_id", "source_label", "latent"], filter=pc.field("fault"))
    points = faults["latent"].combine_chunks().flatten().to_numpy().reshape(faults.num_rows, -1)
    fault_labels = faults["source_label"].to_numpy()
    dims = min(ctx.cfg.reduce.max_dims, *points.shape)
    if dims < points.shape[1]:  # nearest on the principal components, as the regions were fitted (SD latents are long)
        pca = PCA(dims, random_state=ctx.cfg.seed).fit(points)
        points, latents = pca.transform(points), pca.transform(latents)
    anchors = np.zeros(len(latents), np.int64)
    for label in np.unique(labels):
        pool = np.flatnonzero(fault_labels == label)
        pool = pool if len(pool) else np.arange(len(points))
        rows = np.flatnonzero(labels == label)
        anchors[rows] = pool[NearestNeighbors(n_neighbors=1).fit(points[pool]).kneighbors(latents[rows])[1][:, 0]]
    ids = faults["source_id"].take(anchors).to_pylist()
    search = ctx.search
    row = {sid: i for i, sid in enumerate(search.source_ids)}
    return {"anchor_id": ids, "anchor_image": [search.images[row[s]].tobytes() for s in ids],
            "mask": [search.masks[row[s]].tobytes() for s in ids]}


def run_region_samples(ctx: RunContext, constructor: dict, progress=None) -> dict:
    cfg, store = ctx.cfg, ctx.store
    store.resume_stage("region_samples")
    regions = store.read_table("regions")
    if regions.num_rows == 0 or cfg.reduce.samples_per_region == 0:
        return {"region_samples": 0, "candidates": 0}
    dominant = dict(zip(regions["region_id"].to_pylist(), regions["dominant_source_label"].to_pylist()))
    anchors = (lambda labels, latents: segmentation_anchors(ctx, labels, latents)) if ctx.segmentation else None
    return decode_region_samples(cfg, store, "region_samples", regions, cfg.reduce.samples_per_region, dominant,
                                 constructor, progress, anchors)


def new_run_id() -> str:
    """The default run id: the start time, to the second."""
    return time.strftime("%Y%m%d-%H%M%S")


def run_campaign(config, output: str | None = None, run_id: str | None = None,
                 stop_after: str | None = None, progress: Callable[[Progress], None] | None = None) -> CampaignResult:
    """Run (or resume) a campaign and return where it lives and what it found.

    One driver owns a run at a time (a lease in the run folder, see ``genstress_ray.lease``); a run id
    means one config, so resuming with a config that differs in anything but where and on what
    resources it runs is refused (``genstress_ray.runs.RELOCATABLE``). Progress is logged on the
    ``genstress_ray`` logger: one line per stage, and rows done / total / ETA while a stage runs.

    Args:
        config: a YAML path, a dict or a ``CampaignConfig``.
        output: overrides ``config.output`` (local path or fsspec URI such as ``s3://bucket/prefix``).
        run_id: overrides ``config.run_id``; rerunning an existing run id resumes it.
        stop_after: run the stages up to and including this one (``identify``, ``regions``); a later
            call without it resumes from there.
        progress: called with a ``genstress_ray.progress.Progress`` (stage, rows done, total, ETA)
            every 2 s while a Ray stage runs; default: a log line on ``genstress_ray.progress``.

    Raises:
        ConfigError, DataError, ModelError, StorageError: bad input, named, before any Ray work.
        LeaseHeld: another driver is writing the run.
        StageError: a stage failed; nothing of it was committed, and the same call resumes.

    Example:
        >>> result = run_campaign({"campaign": "doc"}, output="/tmp/runs")  # doctest: +SKIP
        >>> print(result.summary())  # doctest: +SKIP
    """
    started = time.time()
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after: unknown stage {stop_after!r}; allowed: {', '.join(STAGES)}")
    stages = STAGES[: STAGES.index(stop_after) + 1] if stop_after else STAGES
    cfg = load_config(config, output=output, run_id=run_id)
    torch.set_num_threads(cfg.threads)
    check_disjoint(cfg)  # search and evaluation never share an image: refused before anything is written
    run_id = cfg.run_id or new_run_id()
    cfg = cfg.model_copy(update={"run_id": run_id})
    store = RunStore(cfg.output, cfg.campaign, run_id, cfg.storage_options)
    store.check_writable()
    with RunLease.for_store(store) as lease:
        return _run_owned(cfg, store, stages, lease, started, progress)


def _run_owned(cfg: CampaignConfig, store: RunStore, stages: tuple[str, ...], lease: RunLease,
               started: float, progress) -> CampaignResult:
    manifest = store.read_manifest()
    current = cfg.model_dump(mode="json")
    stored = manifest_config(store, manifest) if manifest else None
    if stored is not None:
        refuse_differences(stored, current, f"run {store.uri} was made with another config",
                           ". Use a new run id (README: 'Runs and resuming')")
    # The configs whose finished stages this run may keep: this one, and the one the manifest recorded
    # (it may differ by fields added since, with their defaults).
    fingerprint = config_fingerprint(current)
    made_by = Made(fingerprint, {fingerprint, *([config_fingerprint(stored)] if stored is not None else [])},
                   stored is not None)
    _refuse_foreign_stages(store, stages, made_by)  # before anything is written, the manifest included
    ctx = RunContext.from_config(cfg, store, manifest)
    # Load once on the driver: a shape, class-count or checkpoint mismatch fails here, before Ray work.
    ctx.classifier()
    generator = ctx.check_generator()
    boundary = ctx.boundary()  # unknown boundary classes fail here too
    # Before the search: can its faults mean anything? (Kept from the run's start when resumed.)
    fidelity = ctx.manifest.get("fidelity") or generator_fidelity(ctx, generator)
    _start_manifest(ctx, boundary, fidelity)
    init_ray(cfg)
    constructor = ctx.stage_constructor(boundary)
    runners = {"identify": lambda: run_identify(ctx, generator, constructor, progress),
               "regions": lambda: run_regions(cfg, store),
               "region_samples": lambda: run_region_samples(ctx, constructor, progress)}
    skipped = [stage for stage in stages if not _run_stage(store, stage, runners[stage], lease, made_by)]
    return _finish(ctx, stages, skipped, started)


def _start_manifest(ctx: RunContext, boundary: dict | None, fidelity: dict) -> None:
    """Write a new run's manifest, or mark a resumed one running (refusing other models)."""
    store, cfg = ctx.store, ctx.cfg
    models = {k: v.uri for k, v in ctx.models.items()}
    if not ctx.manifest:
        store.write_manifest({"config": cfg.model_dump(mode="json"), "run_id": store.run_id, "campaign": cfg.campaign,
                              "created_at": time.time(), "versions": library_versions(),
                              "seeds": {"campaign": cfg.seed}, "models": models, "class_names": ctx.class_names,
                              "image_shape": list(ctx.image_shape), "status": "running", "fidelity": fidelity,
                              **({"boundary": boundary} if boundary else {})})
        return
    if ctx.manifest.get("models") != models:
        raise ConfigError(f"run {store.uri} was made with the models {ctx.manifest.get('models')}, and this config "
                          f"now gives {models}: use a new run id")
    store.update_manifest(status="running", fidelity=fidelity)


FINGERPRINT = "config_fingerprint"  # the key of a completion marker that names the config that made the stage


@dataclass(frozen=True)
class Made:
    """Which configs a run's finished stages may come from: ``fingerprint`` (this config's, written
    into each marker), ``accepted`` (this one's and the manifest's), ``manifest`` (the run has one)."""

    fingerprint: str
    accepted: set[str]
    manifest: bool


def _refuse_foreign_stages(store: RunStore, stages: tuple[str, ...], made: Made) -> None:
    """A ConfigError when a finished stage was made by another config (its marker's fingerprint)."""
    for stage in stages:
        recorded = store.marker(stage).get(FINGERPRINT) if store.is_complete(stage) else None
        if recorded is not None and recorded not in made.accepted:  # None: a marker older than fingerprints
            raise ConfigError(f"stage {stage} of run {store.uri} was made by another config (fingerprint {recorded}, "
                              f"this config's is {made.fingerprint})"
                              + ("" if made.manifest else " and the run's manifest is missing") +
                              ": its tables are not this config's. Use a new run id")


def _run_stage(store: RunStore, stage: str, runner: Callable[[], dict], lease: RunLease, made: Made) -> bool:
    """Run one stage unless it is complete; commit it only while this driver holds the run. Returns
    whether it ran."""
    if store.is_complete(stage):
        damaged = store.damaged_files(stage)
        if not damaged:
            log.info("stage %s: already complete, skipped", stage)
            return False
        # Rows are deterministic: the damaged files are computed again, the same as they were written.
        log.warning("stage %s: %d damaged file(s) (%s), computing them again", stage, len(damaged),
                    "; ".join(f"{p}: {why}" for p, why in list(damaged.items())[:3]))
        lease.check()
        store.reopen_stage(stage, list(damaged))
    log.info("stage %s: running", stage)
    t0 = time.time()
    lease.check()  # begin_stage clears the stage's folder: only its owner may
    try:
        info = runner()
    except USER_ERRORS:
        raise
    except Exception as exc:
        raise StageError(stage, store.uri, exc) from exc
    info["seconds"], info[FINGERPRINT] = round(time.time() - t0, 3), made.fingerprint
    lease.check()  # a driver that lost the run commits nothing
    store.complete_stage(stage, info)
    store.update_manifest(stages={stage: info}, timings={stage: info["seconds"]})
    log.info("stage %s: done in %.1fs (%s)", stage, info["seconds"], _counts_text(info))
    return True


def _finish(ctx: RunContext, stages: tuple[str, ...], skipped: list[str], started: float) -> CampaignResult:
    """The run's row counts and status into its manifest, and the result."""
    store = ctx.store
    markers = {stage: store.marker(stage) for stage in stages}
    identify, regions_info = markers["identify"], markers.get("regions", {})
    counts = {"candidates": identify.get("candidates", 0), "faults": identify.get("faults", 0),
              "samples": identify.get("samples", 0),
              "nonfinite_dropped": sum(m.get("nonfinite_dropped", 0) for m in markers.values()),
              "regions": regions_info.get("regions", 0),
              "region_samples": markers.get("region_samples", {}).get("region_samples", 0),
              **{k: identify[k] for k in ("unreadable", "unreadable_first") if k in identify}}
    status = "complete" if stages == STAGES else f"stopped after {stages[-1]}"
    store.update_manifest(row_counts=counts, status=status,
                          timings={"total_last_invocation": round(time.time() - started, 3)})
    regions = store.read_table("regions").to_pylist() if "regions" in stages else []
    return CampaignResult(store.uri, store.run_id, counts, regions, ctx.class_names, skipped,
                          regions_info.get("message", ""), store.read_manifest().get("fidelity"))


def _counts_text(info: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in info.items()
                     if k not in ("seconds", FINGERPRINT) and v not in ("", None) and not isinstance(v, (dict, list)))
