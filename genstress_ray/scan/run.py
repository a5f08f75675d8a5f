"""``genstress scan``: run a scan's campaigns on a registry's newest version and track every failure
region across versions.

One scan per date, in ``<output>/<scan>/<YYYY-MM-DD>/``:

    started.json        the version the scan pinned when it started (a rerun resumes with it)
    members/<campaign>.parquet
                        real test images inside each failure region of that scan (image, region, label)
    index.html          the scan report
    scan.json           written last: a scan is complete when it exists

Each campaign runs as an ordinary run, ``<output>/<campaign>/<scan>-<date>``, then its regions are
labelled by the campaign's oracle and its failure regions get region test sets (``region_sets``, as
for a correction). The version is then scored on the region test sets and real members of every
region tracked so far, its own failure regions are matched to them (``scan.tracking``), and each
tracked region gets its status. A lease on the date's folder lets one trigger run it at a time.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genstress_ray.config import CampaignConfig
from genstress_ray.context import RunContext, load_split, model_ref, open_source
from genstress_ray.data import decode_images, png_bytes
from genstress_ray.lease import RunLease
from genstress_ray.models import ModelError, load_classifier
from genstress_ray.models.training import images_predictions
from genstress_ray.models.versions import ModelVersion, newest_version
from genstress_ray.labeling import flagged_regions
from genstress_ray.regions import Footprint, footprints, region_pairs
from genstress_ray.scan.config import ScanConfig, load_scan_config
from genstress_ray.scan.tracking import MATCH_QUANTILE, STATUSES, Evidence, accuracy, alerts, match_regions, next_status, trend_text
from genstress_ray.storage import RunStore, filesystem_for, write_bytes_atomic

log = logging.getLogger(__name__)
RECORD, STARTED, REPORT = "scan.json", "started.json", "index.html"
EXAMPLES = 8  # region test images shown per tracked region in the report


class ScanError(Exception):
    """A scan that cannot run: a bad date, an incomplete or later scan, classes that changed."""


@dataclass
class ScanResult:
    uri: str
    record: dict
    already_complete: bool = False
    unused: list[str] = field(default_factory=list)

    @property
    def alerts(self) -> list[str]:
        return self.record.get("alerts", [])

    def summary(self) -> str:
        r = self.record
        head = "already complete, nothing redone: " if self.already_complete else ""
        lines = [f"{head}scan {r['scan']} {r['date']} of version {r['version']['version']}: {self.uri}"]
        lines += [f"  not used: {u}" for u in self.unused]
        for campaign, s in r["strategies"].items():
            lines.append(f"  {campaign} ({s['strategy']}): {s['candidates']} candidates, {s['faults']} faults, "
                         f"{s['failure_regions']} failure regions; tracked: " +
                         ", ".join(f"{s.get(k, 0)} {k}" for k in STATUSES))
        for t in r["regions"]:
            if t["status"] in ("persisting", "regressed") and len(t["history"]) > 1:
                lines.append(f"  {t['status']} {t['id']} ({t['label']}): {trend_text(t['history'])}")
        for line in self.alerts:
            lines.append(f"  ALERT {line}")
        lines.append(f"report: {self.uri}/{REPORT}")
        return "\n".join(lines)


def scan_date(text: str | None, today: date | None = None) -> date:
    """The scan's date: ``text`` (YYYY-MM-DD), or today (UTC); a date in the future is refused."""
    today = today or datetime.now(timezone.utc).date()
    if text is None:
        return today
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise ScanError(f"--date {text!r} is not a date (YYYY-MM-DD)") from None
    if day > today:
        raise ScanError(f"--date {day} is in the future (today is {today} UTC): a scan records what a version did")
    return day


class ScanFolder:
    """``<output>/<scan>/``: one folder per scan date."""

    def __init__(self, cfg: ScanConfig):
        self.fs, root = filesystem_for(cfg.output, cfg.storage_options)
        self.root, self.uri = f"{root.rstrip('/')}/{cfg.scan}", f"{cfg.output.rstrip('/')}/{cfg.scan}"

    def path(self, day: str, *parts: str) -> str:
        return "/".join((self.root, day, *parts))

    def dates(self) -> dict[str, bool]:
        """Every scan date with a folder, and whether its scan is complete."""
        if not self.fs.exists(self.root):
            return {}
        out = {}
        for entry in self.fs.ls(self.root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            try:
                date.fromisoformat(name)
            except ValueError:
                continue
            out[name] = self.fs.exists(self.path(name, RECORD))
        return dict(sorted(out.items()))

    def read(self, day: str, name: str = RECORD) -> dict:
        try:
            return json.loads(self.fs.cat_file(self.path(day, name)))
        except (OSError, ValueError) as exc:
            raise ScanError(f"{self.uri}/{day}/{name} cannot be read: {exc}") from None

    def write(self, day: str, name: str, data: bytes) -> None:
        self.fs.makedirs(self.path(day), exist_ok=True)
        write_bytes_atomic(self.fs, self.path(day, name), data)


def with_version(campaign: CampaignConfig, version: ModelVersion) -> CampaignConfig:
    """The campaign with its classifier replaced by the version's checkpoint."""
    return campaign.model_copy(update={"classifier": campaign.classifier.model_copy(update={"uri": version.uri})})


def _check_classes(version: ModelVersion, campaigns: dict[str, CampaignConfig], previous: dict | None) -> dict:
    """Each campaign's class names, checked against the previous scan's and against the version's outputs."""
    names = {}
    for name, cfg in campaigns.items():
        catalog = open_source(cfg.data.search, f"{name}: data.search")[1]
        names[name] = list(catalog.class_names)
        before = (previous or {}).get("class_names", {}).get(name)
        if before is not None and before != names[name]:
            raise ScanError(f"campaign {name}: its classes {names[name]} differ from the previous scan's {before} "
                            f"({previous['date']}); regions cannot be tracked across different classes")
        try:  # loading checks the version's outputs against the classes
            load_classifier(model_ref(cfg.classifier, version.uri), names[name], catalog.image_shape)
        except ModelError as exc:
            raise ScanError(f"version {version.version} ({version.uri}) does not fit campaign {name}: {exc}") from None
    return names


def _region_test(run_uri: str, region_id: int, draws: list[int],
                 storage_options: dict) -> tuple[np.ndarray, np.ndarray]:
    """A failure region's test samples (images, labels) from the run that found it."""
    store = RunStore.from_uri(run_uri, storage_options)
    table = store.read_table("region_sets", columns=["image", "source_label", "draw"],
                             filter=(pc.field("region_id") == region_id) & (pc.field("draw") >= draws[0])
                             & (pc.field("draw") < draws[1]))
    if table.num_rows == 0:
        return np.zeros((0,)), np.zeros(0, np.int64)
    images = decode_images(table["image"].to_pylist(), [f"{run_uri} region {region_id}"] * table.num_rows, None)
    return images, table["source_label"].to_numpy()


def _accuracy(classifier, images: np.ndarray, labels: np.ndarray) -> tuple[float | None, int, np.ndarray]:
    if not len(labels):
        return None, 0, np.zeros(0, np.int64)
    preds = images_predictions(classifier, images)
    return float((preds == labels).mean()), int(len(labels)), preds


class CampaignScan:
    """One campaign of a scan: its run on the version, labels, region test sets and real members."""

    def __init__(self, cfg: ScanConfig, folder: ScanFolder, day: str, campaign: CampaignConfig):
        self.cfg, self.folder, self.day, self.campaign = cfg, folder, day, campaign
        self.run_id = f"{cfg.scan}-{day}"
        self._footprints: dict[str, dict[int, Footprint]] = {}

    def run(self) -> dict:
        """Run (or resume) the campaign, label its regions with its oracle and make the failure regions'
        test sets; returns the run's counts."""
        from genstress_ray import labeling
        from genstress_ray.correction.run import ensure_region_sets
        from genstress_ray.pipeline import run_campaign

        t0 = time.time()
        result = run_campaign(self.campaign, output=self.cfg.output, run_id=self.run_id)
        store = RunStore.from_uri(result.run_uri, self.cfg.storage_options)
        if not (store.is_complete("labels") and "oracle" in store.marker("labels").get("sources", [])):
            table = labeling.LABELLERS.get("oracle").label(store, labeling.CONFIG_ORACLE, {"config": self.campaign})
            labeling.write_labels(store, table, result.class_names)
        self.ctx = RunContext.open(result.run_uri, self.campaign, self.cfg.storage_options)
        self.failure_labels = ensure_region_sets(self.ctx)
        self._write_members()
        return {**result.counts, "run": result.run_uri, "seconds": round(time.time() - t0, 1)}

    @property
    def members_name(self) -> str:
        return f"members/{self.campaign.campaign}.parquet"

    def _write_members(self) -> None:
        """The real test images inside this run's failure regions, each with its own label and its
        region's (``target``), kept with the scan for later versions."""
        from genstress_ray.real_regions import FailureRegions

        if self.folder.fs.exists(self.folder.path(self.day, self.members_name)):
            return
        rows = {"region_id": [], "label": [], "target": [], "image": []}
        regions = FailureRegions.open(self.ctx, self.failure_labels, self.cfg.member_quantile) \
            if self.failure_labels else "no failure regions"
        if isinstance(regions, str):
            log.info("scan %s: real members %s", self.campaign.campaign, regions)
        else:
            members = regions.members(load_split(self.ctx.cfg.test_spec(), "correction.test"))
            for i in np.flatnonzero(members.inside):
                rows["region_id"].append(int(members.region[i]))
                rows["label"].append(int(members.split.labels[i]))
                rows["target"].append(int(members.target[i]))
                rows["image"].append(png_bytes(members.split.images[i]))
        table = pa.table({k: pa.array(v, pa.binary() if k == "image" else pa.int64()) for k, v in rows.items()})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.folder.fs.makedirs(self.folder.path(self.day, "members"), exist_ok=True)
        write_bytes_atomic(self.folder.fs, self.folder.path(self.day, self.members_name), sink.getvalue().to_pybytes())

    def members(self, day: str, region_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Real test images inside a region found on ``day``: images, their own labels, and whether each
        is of the region's subgroup (its label is the region's). A members table written before own
        labels were kept holds no usable member."""
        path = self.folder.path(day, self.members_name)
        none = np.zeros((0,)), np.zeros(0, np.int64), np.zeros(0, bool)
        if not self.folder.fs.exists(path):
            return none
        with self.folder.fs.open(path, "rb") as f:
            table = pq.read_table(f, filters=[("region_id", "=", region_id)])
        if table.num_rows == 0 or "target" not in table.column_names:
            return none
        labels = table["label"].to_numpy()
        images = decode_images(table["image"].to_pylist(), [path] * table.num_rows, None)
        return images, labels, labels == table["target"].to_numpy()

    def footprints(self, run_uri: str) -> dict[int, Footprint]:
        """Every region of a run with where its faults lie (``regions.footprints``), read once per scan."""
        if run_uri not in self._footprints:
            store = RunStore.from_uri(run_uri, self.cfg.storage_options)
            faults = store.read_table("identify", columns=["latent", "source_label", "pred"],
                                      filter=pc.field("fault"))
            latents = faults["latent"].combine_chunks().flatten().to_numpy().reshape(faults.num_rows, -1) \
                if faults.num_rows else np.zeros((0, 0))
            classes = np.stack([faults["source_label"].to_numpy(), faults["pred"].to_numpy()], 1) \
                if faults.num_rows else np.zeros((0, 2), np.int64)
            self._footprints[run_uri] = footprints(store.read_table("regions"), latents, MATCH_QUANTILE, classes)
        return self._footprints[run_uri]

    def _origin(self, tracked: dict) -> Footprint:
        o = tracked["origin"]
        found = self.footprints(o["run"]).get(o["region_id"])
        if found is None:
            raise ScanError(f"tracked region {tracked['id']}: region {o['region_id']} is gone from {o['run']}")
        return found

    def evidence(self, tracked: dict, classifier) -> tuple[Evidence, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The version's accuracy on a tracked region's held-out evidence, and its generated test
        images with their labels and the version's predictions (for the report)."""
        o = tracked["origin"]
        images, labels = _region_test(o["run"], o["region_id"], o["test_draws"], self.cfg.storage_options)
        generated, n, preds = _accuracy(classifier, images, labels)
        real_images, real_labels, subgroup = self.members(o["date"], o["region_id"])
        real_preds = images_predictions(classifier, real_images) if len(real_labels) else np.zeros(0, np.int64)
        sub = accuracy(real_preds[subgroup], real_labels[subgroup])
        other = accuracy(real_preds[~subgroup], real_labels[~subgroup])
        return Evidence(generated, n, *sub, *other), (images, labels, preds)

    def track(self, previous: list[dict], version: dict) -> tuple[list[dict], dict[str, list[dict]]]:
        """This campaign's tracked regions after this scan (with history), and example images per region."""
        ctx, cfg, name = self.ctx, self.cfg, self.campaign.campaign
        classifier = ctx.classifier()
        store = ctx.store
        generator = ctx.models["generator"].uri
        flags = flagged_regions(store.read_table("labels"))
        found = self.footprints(store.uri)
        current = {rid: (label, found[rid]) for rid, label in self.failure_labels.items()}
        comparable = [(t["id"], ctx.class_names.index(t["label"]), self._origin(t)) for t in previous
                      if t["origin"]["generator"] == generator]
        matched, nearest = match_regions(current, comparable, cfg.match_containment)
        c = ctx.cfg.correction
        draws = [c.finetune_per_region, c.finetune_per_region + c.test_per_region]
        new = [{"id": f"{name}/{self.day}/r{rid}", "campaign": name,
                "origin": {"date": self.day, "run": store.uri, "region_id": rid, "test_draws": draws,
                           "generator": generator},
                "label": ctx.class_names[label], "pairs": region_pairs(fp.row, ctx.class_names),
                "faults": fp.row["n_members"],
                "history": [], **({"flag": flags[rid]} if rid in flags else {})}
               for rid, (label, fp) in sorted(current.items()) if rid not in matched]
        closest = {t["id"]: nearest[t["origin"]["region_id"]] for t in new if t["origin"]["region_id"] in nearest}
        tracked, examples = [], {}
        for t in [*previous, *new]:
            overlaps = {rid: score for rid, (tid, score) in matched.items() if tid == t["id"]}
            evidence, (images, labels, preds) = self.evidence(t, classifier)
            evidence.matched = bool(overlaps)
            status = next_status(t["history"][-1]["status"] if t["history"] else None, evidence, cfg.fixed_accuracy)
            entry = {"date": self.day, "version": version["version"], "status": status,
                     "accuracy": evidence.generated, "n": evidence.generated_n,
                     "real_subgroup": evidence.real_subgroup, "real_subgroup_n": evidence.real_subgroup_n,
                     "real_collateral": evidence.real_collateral, "real_collateral_n": evidence.real_collateral_n,
                     "matched": {str(rid): round(score, 4) for rid, score in overlaps.items()}}
            if t["id"] in closest:
                entry["closest"] = [closest[t["id"]][0], round(closest[t["id"]][1], 4)]
            tracked.append({**t, "status": status, "history": [*t["history"], entry]})
            examples[t["id"]] = [{"image": png_bytes(images[i]), "pred": ctx.class_names[int(preds[i])],
                                  "correct": bool(preds[i] == labels[i])} for i in range(min(EXAMPLES, len(labels)))]
        return tracked, examples


def _strategy_row(campaign: CampaignConfig, counts: dict, tracked: list[dict], failure_regions: int) -> dict:
    statuses = [t["status"] for t in tracked]
    calls = counts.get("candidates", 0)
    return {"strategy": campaign.strategy.name, "candidates": calls, "faults": counts.get("faults", 0),
            "faults_per_call": counts.get("faults", 0) / calls if calls else 0.0, "regions": counts.get("regions", 0),
            "failure_regions": failure_regions, "run": counts["run"], "seconds": counts["seconds"],
            **{s: statuses.count(s) for s in STATUSES}}


def _previous(folder: ScanFolder, day: str) -> dict | None:
    """The last complete scan before ``day``; refuses to go on after an incomplete one or before a later one."""
    dates = folder.dates()
    later = [d for d in dates if d > day]
    if later:
        raise ScanError(f"{folder.uri} already holds scans after {day} ({', '.join(later)}): a scan history only "
                        "grows forward")
    unfinished = [d for d, complete in dates.items() if d < day and not complete]
    if unfinished:
        raise ScanError(f"the scan of {unfinished[-1]} in {folder.uri} is incomplete: finish it first with "
                        f"genstress scan ... --date {unfinished[-1]} (nothing of today's scan was started)")
    earlier = [d for d, complete in dates.items() if d < day and complete]
    return folder.read(earlier[-1]) if earlier else None


def run_scan(config, day: str | None = None, output: str | None = None, today: date | None = None,
             registry: str | None = None) -> ScanResult:
    """Scan the registry's newest version on ``day`` (default: today, UTC).

    A complete scan of that date is returned as it is; an incomplete one resumes with the version it
    pinned. Raises ScanError (and the config, data, model and storage errors) before anything is
    written for bad input.

    Example:
        >>> result = run_scan("jobs/digits_scan.yaml", "2026-12-06")  # doctest: +SKIP
        >>> result.alerts  # doctest: +SKIP
    """
    started = time.time()
    cfg, campaigns = load_scan_config(config, output, registry)
    day = scan_date(day, today).isoformat()
    folder = ScanFolder(cfg)
    if folder.dates().get(day):
        record = folder.read(day)
        return ScanResult(f"{folder.uri}/{day}", record, already_complete=True, unused=_unused(cfg, campaigns, record))
    previous = _previous(folder, day)
    pinned = _pinned(folder, day)
    if pinned:
        version = ModelVersion(pinned["version"], pinned["uri"])
        log.info("scan %s %s: resuming with version %s", cfg.scan, day, version.version)
    else:
        version = newest_version(cfg.registry, cfg.storage_options)
    campaigns = {n: with_version(c, version) for n, c in campaigns.items()}
    class_names = _check_classes(version, campaigns, previous)
    folder.fs.makedirs(folder.path(day), exist_ok=True)
    with RunLease(folder.fs, folder.path(day), f"{folder.uri}/{day}"):
        if folder.fs.exists(folder.path(day, RECORD)):  # another trigger finished it meanwhile
            return ScanResult(f"{folder.uri}/{day}", folder.read(day), already_complete=True)
        described = {"version": version.version, "uri": version.uri,
                     "created": version.created.isoformat() if version.created else None}
        if not pinned:
            folder.write(day, STARTED, json.dumps({"version": described, "started_at": time.time()}).encode())
        record = _scan(cfg, folder, day, campaigns, previous, described)
        record.update(class_names=class_names, seconds=round(time.time() - started, 1))
        from genstress_ray.scan.report import scan_report

        folder.write(day, REPORT, scan_report(record, _history(folder, day, record), record.pop("_examples")).encode())
        folder.write(day, RECORD, json.dumps(record, indent=1).encode())  # last: the scan is complete
    return ScanResult(f"{folder.uri}/{day}", record)


def _unused(cfg: ScanConfig, campaigns: dict[str, CampaignConfig], record: dict) -> list[str]:
    """What a rerun of a complete scan date asked for that differs from what the scan used (nothing
    is redone, so none of it was used)."""
    out = []
    if cfg.registry != record.get("registry"):
        out.append(f"registry {cfg.registry} (the scan of {record['date']} is complete; it scanned "
                   f"{record.get('registry')})")
    asked, done = sorted(campaigns), sorted(record.get("strategies", {}))
    if asked != done:
        out.append(f"campaigns {', '.join(asked)} (the scan of {record['date']} ran {', '.join(done) or 'none'})")
    return out


def _pinned(folder: ScanFolder, day: str) -> dict | None:
    """The version an unfinished scan of ``day`` started with (None: not started)."""
    if not folder.fs.exists(folder.path(day, STARTED)):
        return None
    pinned = folder.read(day, STARTED).get("version")
    if not isinstance(pinned, dict) or not {"version", "uri"} <= set(pinned):
        raise ScanError(f"{folder.uri}/{day}/{STARTED} names no version and uri: not a scan's start record")
    return pinned


def _scan(cfg: ScanConfig, folder: ScanFolder, day: str, campaigns: dict[str, CampaignConfig], previous: dict | None,
          version: dict) -> dict:
    tracked_before = (previous or {}).get("regions", [])
    record = {"scan": cfg.scan, "date": day, "version": version, "previous": (previous or {}).get("date"),
              "registry": cfg.registry, "strategies": {}, "regions": [], "_examples": {},
              "thresholds": {"fixed_accuracy": cfg.fixed_accuracy, "match_containment": cfg.match_containment,
                             **cfg.alert.model_dump()}}
    for i, (name, campaign) in enumerate(campaigns.items(), 1):
        log.info("scan %s %s: campaign %s (%d/%d), %s on version %s", cfg.scan, day, name, i, len(campaigns),
                 campaign.strategy.name, version["version"])
        part = CampaignScan(cfg, folder, day, campaign)
        counts = part.run()
        tracked, examples = part.track([t for t in tracked_before if t["campaign"] == name], version)
        record["regions"] += tracked
        record["_examples"].update(examples)
        record["strategies"][name] = _strategy_row(campaign, counts, tracked, len(part.failure_labels))
    a = cfg.alert
    record["alerts"] = alerts(record["regions"], a.regressed, a.new_region_faults, a.accuracy_drop)
    return record


def _history(folder: ScanFolder, day: str, record: dict) -> list[dict]:
    """Every complete scan before ``day`` and this one, oldest first (for the trend plot)."""
    return [folder.read(d) for d, complete in folder.dates().items() if complete and d < day] + [record]


def main_scan(config: str | Path, day: str | None, output: str | None = None, registry: str | None = None) -> int:
    """``genstress scan``: 0 when all is well, 3 when a threshold of ``alert`` was crossed."""
    result = run_scan(config, day, output, registry=registry)
    print(result.summary())
    if result.unused:
        print(f"note: the scan of {result.record['date']} is complete; use another --date to scan again")
    return 3 if result.alerts else 0

