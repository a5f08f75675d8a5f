"""Correct a labelled run: region sets -> lambda sweep (Defuse and baseline) -> selection -> results.

Two stages are added to the run:

- ``region_sets``: fresh samples of every failure region, decoded and classified on Ray: draws
  ``0 .. finetune_per_region - 1`` are the fine-tune set (its last ``region_validation_fraction``
  choose lambda), the following ``test_per_region`` draws the held-out region test set. Every sample
  carries its region's label.
- ``correction``: ``trials`` (one row per method and lambda), ``results.json`` (the before / baseline /
  Defuse table) and the selected checkpoints under ``correction/<method>/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from genstress_ray.config import CampaignConfig
from genstress_ray.context import RunContext, check_disjoint, open_source
from genstress_ray.correction.datasets import (fault_dataset, kept_in_memory, members_dataset, region_set_dataset,
                                               split_dataset)
from genstress_ray.correction.finetune import FinetuneSettings, rate, selection_score
from genstress_ray.correction.real import (real_member_accuracy, real_member_datasets, real_member_lines,
                                           region_placement)
from genstress_ray.correction.trials import TrialResources, run_trials
from genstress_ray.data import Catalog, DatasetSource
from genstress_ray.labeling import flagged_regions
from genstress_ray.labeling.table import LabelError, read_labels
from genstress_ray.lease import RunLease
from genstress_ray.pipeline import decode_region_samples, init_ray
from genstress_ray.real_regions import FailureRegions, failure_region_labels
from genstress_ray.repair import apply_relabels, read_relabels
from genstress_ray.storage import CORRECTION_RESULTS, RunStore, StageError, read_bytes, write_bytes_atomic

log = logging.getLogger(__name__)
RESULT_KEYS = ("test_acc", "region_test_acc", "val_acc", "region_val_acc", "real_members_val_acc",
               "real_members_test_acc")


@dataclass
class CorrectionResult:
    run_uri: str
    results: dict[str, Any]

    def summary(self) -> str:
        r = self.results
        lines = [f"correction of {self.run_uri}: {r['n_failure_regions']} failure regions of {r['n_regions']}"]
        if r.get("message"):
            lines.append(r["message"])
        if r.get("left_out"):
            lines.append("left out, their label is flagged (confirm with --confirm-flagged): " + "; ".join(
                f"region {k}: {v}" for k, v in r["left_out"].items()))
        lines.append(f"{'':>10} {'test acc':>9} {'region acc (generated)':>23} {'lambda':>8}")
        for name in ("before", "baseline", "defuse"):
            row = r.get(name)
            if row:
                lam = "" if row.get("lam") is None else f"{row['lam']:g}"
                region = row.get("region_test_acc", float("nan"))
                lines.append(f"{name:>10} {row['test_acc']:>9.4f} {region:>23.4f} {lam:>8}")
        lines += real_member_lines(r.get("real_members", {}))
        if r.get("relabels"):
            lines.append(f"data repair: {r['relabels']['applied']} training labels changed before fine-tuning")
        return "\n".join(lines)


def _fault_labels(labels: pa.Table, class_names: list[str], limit: int, seed: int) -> dict[str, int]:
    """At most ``limit`` individually labelled faults (a seeded choice), sample id -> label index: the
    baseline's Df."""
    labels = labels.filter(pc.invert(pc.is_null(pc.field("sample_id"))))
    ids, names = labels["sample_id"].to_pylist(), labels["label"].to_pylist()
    return {ids[i]: class_names.index(names[i]) for i in np.random.default_rng(seed).permutation(len(ids))[:limit]}


def build_region_sets(cfg: CampaignConfig, store: RunStore, failure_labels: dict[int, int], constructor: dict) -> dict:
    """The ``region_sets`` stage: fine-tune + test samples of each failure region."""
    store.begin_stage("region_sets")
    regions = store.read_table("regions")
    regions = regions.filter(pc.field("region_id").isin(list(failure_labels)))
    c = cfg.correction
    # A different seed from region_samples: the sets must not repeat the samples that were labelled.
    return decode_region_samples(cfg, store, "region_sets", regions, c.finetune_per_region + c.test_per_region,
                                 failure_labels, {**constructor, "seed": cfg.seed + 1})


def d_splits(ctx: RunContext, names=("train", "val", "test"),
             relabel: bool = False) -> tuple[dict[str, tuple[ray.data.Dataset, Catalog]], dict | None]:
    """D's ``names`` splits as datasets with their catalogs (``train`` read in a shuffled shard order),
    each source opened once; with ``relabel``, data repair's accepted relabels applied to ``train`` and
    what changed (else None)."""
    cfg, c = ctx.cfg, ctx.cfg.correction
    specs = {"train": (cfg.data.train_spec(), "data.train"), "val": (cfg.data.validation_spec(), "data.validation"),
             "test": (cfg.test_spec(), "correction.test")}
    out, relabelled = {}, None
    for name in names:
        source, catalog = open_source(*specs[name])
        relabels, shuffle_seed = None, None
        if name == "train":
            shuffle_seed = cfg.seed
            if relabel:
                relabels, relabelled = _relabels(ctx.store, source)
        out[name] = split_dataset(source, catalog, cfg.shard_rows, c.read_cpus, relabels, shuffle_seed), catalog
    return out, relabelled


def _relabels(store: RunStore, source: DatasetSource) -> tuple[dict[str, int], dict]:
    """Data repair's accepted relabels of D's training split (its opened ``source``): source id -> new
    label, and what changed."""
    split = source.split_labels()
    labels, changes = apply_relabels(split, read_relabels(store))
    new = {sid: int(n) for sid, n, old in zip(split.source_ids, labels, split.labels) if n != old}
    return new, {"applied": len(changes), "changes": changes}


def correction_datasets(ctx: RunContext, labels: pa.Table, regions: FailureRegions | str):
    """Every dataset the trials read (``trials.run_trials``): D's splits (relabelled with
    ``correction.relabel``), Df as ``correction.region_data`` says, the regions' validation and test
    samples, the baseline's labelled faults and the real images inside the failure regions; then the
    Df of each method, the relabels applied (when asked for) and how the real images were chosen."""
    cfg, store, c = ctx.cfg, ctx.store, ctx.cfg.correction
    splits, relabelled = d_splits(ctx, relabel=c.relabel)
    datasets = {name: ds for name, (ds, _) in splits.items()}
    n_val = max(1, int(round(c.finetune_per_region * c.region_validation_fraction)))
    n_fine = c.finetune_per_region - n_val
    rows = {name: catalog.rows for name, (_, catalog) in splits.items()}
    drawn = store.read_table("region_sets", columns=["draw"])["draw"].to_numpy()
    for name, draws in (("finetune", (0, n_fine)), ("region_val", (n_fine, c.finetune_per_region)),
                        ("region_test", (c.finetune_per_region, c.finetune_per_region + c.test_per_region))):
        datasets[name] = region_set_dataset(store, draws, ctx.image_shape, c.read_cpus)
        rows[name] = int(((drawn >= draws[0]) & (drawn < draws[1])).sum())
    if c.region_data in ("real", "both"):
        real = _real_members(ctx, splits["train"][0], regions, c.region_data)
        both = c.region_data == "both"
        datasets["finetune"] = datasets["finetune"].union(real) if both else real
        rows["finetune"] = rows["finetune"] + real.count() if both else real.count()
    fine_sets = {"defuse": "finetune"}
    if c.baseline:
        faults = _fault_labels(labels, ctx.class_names, rows["finetune"], cfg.seed)
        if faults:
            datasets["baseline"] = fault_dataset(store, faults, ctx.image_shape, c.read_cpus)
            rows["baseline"] = len(faults)
            fine_sets["baseline"] = "baseline"
    real, real_info = real_member_datasets(ctx, regions, {"val": splits["val"], "test": splits["test"]})
    datasets, kept = kept_in_memory(datasets, rows, int(np.prod(ctx.image_shape)), c.cache_mib)
    log.info("correction: read once and kept in the object store: %s; streamed in every trial: %s",
             ", ".join(kept) or "none", ", ".join(sorted(set(datasets) - set(kept))) or "none")
    return {**datasets, **real}, fine_sets, relabelled, real_info


def _real_members(ctx: RunContext, train: ray.data.Dataset, regions: FailureRegions | str, choice: str):
    """The training images inside the failure regions, with their region's label (Df of ``real``)."""
    if isinstance(regions, str):
        raise LabelError(f"correction.region_data: {choice!r} needs the regions' real members, {regions}")
    c = ctx.cfg.correction
    members = members_dataset(train, region_placement(ctx, regions), c.num_cpus_per_worker, c.threads, relabel=True)
    if members.count() == 0:
        raise LabelError(f"correction.region_data: {choice!r}: no training image lies inside a failure region "
                         "(use generated or augmented)")
    return members


def _publish(store: RunStore, trial: dict, method: str) -> str:
    """Copy the selected trial's checkpoint to ``correction/<method>/`` and return its URI."""
    name = trial["checkpoint"].rsplit("/", 1)[1]
    dest = f"{store.stage_path('correction')}/{method}/{name}"
    store.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
    write_bytes_atomic(store.fs, dest, read_bytes(trial["checkpoint"], store.storage_options))
    return store.stage_uri("correction", method, name)


def run_correction(run_uri: str, overrides: dict | None = None, storage_options: dict | None = None,
                   config=None) -> CorrectionResult:
    """Fine-tune a labelled run's classifier to fix its failure regions and write the results into the run.

    A finished correction with the same settings and the same labels is kept, not redone.

    Args:
        run_uri: ``<output>/<campaign>/<run_id>`` of a run with regions and labels.
        overrides: fields of the ``correction`` config section to replace (``{"lambdas": [1, 10]}``).
        config: the campaign's own config, needed when the run names code to import
            (``genstress_ray.runs.run_config``).

    Example:
        >>> print(run_correction("genstress-runs/demo/r1").summary())  # doctest: +SKIP
    """
    started = time.time()
    # Overrides are validated before any work.
    ctx = RunContext.open(run_uri, config, storage_options, {"correction": overrides} if overrides else None)
    ctx.refuse_segmentation("correction", "fine-tunes classifiers on labelled failure regions; fine-tuning a "
                            "segmentation model on its faults is not supported")
    check_disjoint(ctx.cfg)  # a run made before the check, or a test split given as an override
    store = ctx.store
    labels = read_labels(store)
    failure_labels, n_labelled = failure_region_labels(labels, ctx.class_names)
    failure_labels, left_out = _confirmed(failure_labels, flagged_regions(labels), ctx.cfg.correction.confirm_flagged)
    if left_out and not failure_labels:
        reasons = "; ".join(f"region {r}: {why}" for r, why in sorted(left_out.items()))
        raise LabelError(f"every failure region's label is flagged as unsupported by its faults ({reasons}): relabel "
                         f"them, or confirm them with genstress correct {store.uri} --confirm-flagged "
                         f"{' '.join(map(str, sorted(left_out)))}")
    # What decides the outcome: the settings and the labels (relabelling redoes the region sets too).
    done_with = {"settings": ctx.cfg.correction.model_dump(mode="json"), "labels": labels_digest(labels)}
    if ctx.cfg.correction.relabel:
        done_with["relabels"] = table_digest(read_relabels(store), ["sample_id", "label", "accepted"])
    if store.is_complete("correction") and store.marker("correction").get("made_with") == done_with:
        log.info("correction: already complete with these settings and labels, skipped")
        return CorrectionResult(store.uri, store.read_json("correction", CORRECTION_RESULTS))
    with RunLease.for_store(store) as lease:
        results = _correct(ctx, labels, failure_labels, n_labelled, lease)
        if left_out:
            results["left_out"] = {str(r): why for r, why in sorted(left_out.items())}
        n_trials = results.pop("_trials")
        results["seconds"] = round(time.time() - started, 3)
        store.write_json("correction", results, CORRECTION_RESULTS)
        lease.check()
        store.complete_stage("correction", {"trials": n_trials, "made_with": done_with,
                                            "n_failure_regions": len(failure_labels)})
        store.update_manifest(correction=results, timings={"correction": results["seconds"]})
    return CorrectionResult(store.uri, results)


def _confirmed(failure_labels: dict[int, int], flagged: dict[int, str],
               confirmed: list[int]) -> tuple[dict[int, int], dict[int, str]]:
    """The failure regions a correction uses (flagged ones only when confirmed) and those left out."""
    unknown = sorted(set(confirmed) - set(flagged))
    if unknown:
        raise LabelError(f"correction.confirm_flagged: region(s) {unknown} are not flagged failure regions "
                         f"(flagged: {sorted(flagged) or 'none'})")
    left_out = {r: why for r, why in flagged.items() if r not in confirmed and r in failure_labels}
    return {r: lab for r, lab in failure_labels.items() if r not in left_out}, left_out


def labels_digest(labels: pa.Table) -> str:
    """A fingerprint of the labels that decide a correction (which regions are failures, with what label)."""
    rows = sorted((r["region_id"] if r["region_id"] is not None else -1, r["sample_id"] or "", r["label"] or "",
                   bool(r["is_failure"])) for r in labels.select(["region_id", "sample_id", "label", "is_failure"])
                  .to_pylist())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def table_digest(table: pa.Table, columns: list[str]) -> str:
    """A fingerprint of some columns of a table, whatever its row order."""
    rows = sorted(json.dumps(r, sort_keys=True) for r in table.select(columns).to_pylist())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def _correct(ctx: RunContext, labels: pa.Table, failure_labels: dict[int, int], n_labelled: int,
             lease: RunLease) -> dict[str, Any]:
    cfg, store = ctx.cfg, ctx.store
    ctx.classifier()  # a checkpoint that does not load fails here, before anything is written
    init_ray(cfg)
    _ensure_region_sets(ctx, failure_labels, lease)
    results: dict[str, Any] = {"n_regions": store.count_rows("regions"), "n_labelled_regions": n_labelled,
                               "n_failure_regions": len(failure_labels), "failure_regions": sorted(failure_labels),
                               "select_by": cfg.correction.select_by}
    lease.check()
    real_info: dict = {}
    if failure_labels:  # read and checked before the previous correction is cleared
        regions = FailureRegions.open(ctx, failure_labels, cfg.correction.member_quantile)
        datasets, fine_sets, relabelled, real_info = correction_datasets(ctx, labels, regions)
        if relabelled is not None:
            results["relabels"] = relabelled
        if cfg.correction.baseline and "baseline" not in fine_sets:
            results["message"] = "baseline skipped: the labels hold no individually labelled faults"
    else:
        results["message"] = "no failure regions were labelled: nothing to fine-tune"
        datasets, fine_sets = {name: ds for name, (ds, _) in d_splits(ctx, ("val", "test"))[0].items()}, {}
    store.begin_stage("correction")
    before, *trials = _sweep(ctx, datasets, fine_sets)
    results["before"] = {k: before[k] for k in RESULT_KEYS if k in before}
    if trials:
        selected = _select(ctx, trials, fine_sets)
        results.update({m: {**{k: t[k] for k in RESULT_KEYS if k in t}, "lam": t["lam"], "checkpoint": t["published"]}
                        for m, t in selected.items()})
        _drop_trial_checkpoints(store)
        scored = {"before": before, **selected}
        results["per_region"] = _region_rates({m: t["scores"]["region_test"] for m, t in scored.items()})
        results["real_members"] = real_member_accuracy(
            {m: t["scores"]["real_members_test"] for m, t in scored.items() if "real_members_test" in t["scores"]},
            real_info)
        store.write_table("correction", pa.Table.from_pylist(
            [{k: v for k, v in t.items() if k not in ("checkpoint", "scores", "published")} for t in trials]))
    results["_trials"] = len(trials)
    return results


def _region_rates(scores: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Each model's accuracy on each failure region's own test samples: ``{"3": {"n": 256, "before": 0.1,
    "defuse": 0.98}, ...}`` (``scores``: each model's ``score`` of ``region_test``)."""
    regions = scores["before"]["regions"]
    return {rid: {"n": tally[1], **{m: rate(s["regions"].get(rid, [0, 0])) for m, s in scores.items()}}
            for rid, tally in sorted(regions.items(), key=lambda kv: int(kv[0]))}


def ensure_region_sets(ctx: RunContext) -> dict[int, int]:
    """The labelled run's failure regions (region id -> label index), with their ``region_sets`` made
    (fine-tune and test samples) unless made already for these labels. A nightly scan's test sets."""
    failure_labels = failure_region_labels(read_labels(ctx.store), ctx.class_names)[0]
    if failure_labels:
        init_ray(ctx.cfg)
        with RunLease.for_store(ctx.store) as lease:
            _ensure_region_sets(ctx, failure_labels, lease)
    return failure_labels


def _ensure_region_sets(ctx: RunContext, failure_labels: dict[int, int], lease: RunLease) -> None:
    """Make the ``region_sets`` stage unless it was made for these same region labels."""
    store = ctx.store
    wanted = sorted([r, lab] for r, lab in failure_labels.items())
    if not failure_labels or (store.is_complete("region_sets") and store.marker("region_sets").get("labels") == wanted):
        return
    lease.check()
    info = build_region_sets(ctx.cfg, store, failure_labels, ctx.stage_constructor())
    lease.check()
    store.complete_stage("region_sets", {**info, "labels": wanted})


def _select(ctx: RunContext, trials: list[dict], methods: dict[str, str]) -> dict[str, dict]:
    """Per method, the trial with the best ``select_by`` score (marked ``selected``), its weights
    published under ``correction/<method>/`` (``published``)."""
    chosen = {}
    for method in methods:
        mine = [t for t in trials if t["method"] == method]
        best = max(mine, key=lambda t: selection_score(t, ctx.cfg.correction.select_by))
        for t in mine:
            t["selected"] = t is best
        chosen[method] = {**best, "published": _publish(ctx.store, best, method)}
    return chosen


def _sweep(ctx: RunContext, datasets: dict, methods: dict[str, str]) -> list[dict]:
    """The ``before`` row, then one row per method and lambda."""
    cfg, c = ctx.cfg, ctx.cfg.correction
    resources = TrialResources(c.workers, c.num_cpus_per_worker, c.use_gpu, c.threads, c.max_concurrent_trials,
                               c.read_cpus)
    settings = FinetuneSettings(lam=0.0, epochs=c.epochs, lr=c.lr, batch_size=c.batch_size, seed=cfg.seed,
                                augment=c.region_data == "augmented", shuffle_rows=c.shuffle_rows)
    log.info("correction: %d trials (%s x %d lambdas)", len(methods) * len(c.lambdas), "/".join(methods) or "none",
             len(c.lambdas))
    try:
        rows = run_trials(datasets, ctx.models["classifier"], ctx.class_names, ctx.image_shape, methods, c.lambdas,
                          settings, resources, ctx.store.stage_uri("correction", "trials"))
    except Exception as exc:  # a trial's error arrives wrapped in Ray's, its cause as text
        raise StageError("correction", ctx.store.uri, exc) from exc
    for t in rows[1:]:
        log.info("correction: %-8s lambda %-8g val %.4f region val %.4f test %.4f region test %.4f", t["method"],
                 t["lam"], t["val_acc"], t["region_val_acc"], t["test_acc"], t["region_test_acc"])
    return rows


def _drop_trial_checkpoints(store: RunStore) -> None:
    """Every trial's metrics stay in the ``correction`` table; only the selected weights are kept."""
    path = f"{store.stage_path('correction')}/trials"
    if store.fs.exists(path):
        store.remove(path)
