"""Filesystems for any fsspec URI, and the layout of a run on object storage: stages, Parquet schemas,
markers and the manifest.

A run is a folder ``<output>/<campaign>/<run_id>/`` holding one sub-folder per stage, a
``manifest.json`` and, per finished stage, a completion marker ``<stage>/_COMPLETE``. A stage
without its marker is unfinished: rerunning the run deletes whatever it left and redoes it, so a
resumed run never holds duplicate or partial rows.
"""

from __future__ import annotations

import json
import os
import platform
import posixpath
import re
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from genstress_ray.faults import root_cause

MARKER = "_COMPLETE"
MANIFEST = "manifest.json"
# Stages written shard by shard: <stage>/shard-<name>.parquet, counts under this key of its metadata.
SHARD_PREFIX = "shard-"
SHARD_COUNTS = b"genstress_counts"
SHARD_MADE_BY = b"genstress_made_by"
# Every Parquet file genstress writes records its row count, so a file rewritten with fewer rows
# (or truncated) is found on read instead of silently losing rows.
FILE_ROWS = b"genstress_rows"

# The tables of DESIGN.md. A stage that produced no rows writes no file; reading it still gives
# these columns, so no reader has to special-case an empty stage.
SAMPLES_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("source_id", pa.string()), ("source_label", pa.int64()),
    ("strategy", pa.string()), ("params", pa.string()), ("latent", pa.list_(pa.float32())),
    ("image", pa.binary()), ("pred", pa.int64()), ("probs", pa.list_(pa.float32())), ("fault", pa.bool_()),
    ("kldb", pa.float32()), ("entropy", pa.float32()), ("margin", pa.float32()),
    ("draw", pa.int64()), ("seed", pa.int64()),
])
REGION_SAMPLES_SCHEMA = SAMPLES_SCHEMA.append(pa.field("region_id", pa.int64()))
REGIONS_SCHEMA = pa.schema([
    ("region_id", pa.int64()), ("weight", pa.float64()), ("mean", pa.list_(pa.float32())),
    ("cov", pa.list_(pa.float32())), ("n_members", pa.int64()), ("dominant_source_label", pa.int64()),
    ("dominant_source_share", pa.float64()), ("dominant_pred", pa.int64()), ("dominant_pred_share", pa.float64()),
    # Null for regions fitted in the latent space itself. For long latents (styles of a style-based
    # generator) the mixture is fitted on a PCA projection: ``basis`` holds its (r, d) rows, ``cov`` is
    # then r x r in that basis, and ``mean`` stays in the latent space.
    ("basis", pa.list_(pa.float32())),
    # The most common (true class, predicted class) pairs among the members, as JSON
    # [[true, predicted, share], ...]: the two dominant classes alone can read "true 1, predicted 1"
    # for a region that mixes 1s called 7 with 7s called 1.
    ("top_pairs", pa.string()),
])
# One row per labelled region (or, for the correction baseline, per labelled fault).
LABELS_SCHEMA = pa.schema([
    ("region_id", pa.int64()), ("sample_id", pa.string()), ("label", pa.string()), ("is_failure", pa.bool_()),
    ("source", pa.string()), ("annotator", pa.string()), ("time", pa.float64()), ("agreement", pa.float64()),
    # Why a failure region's label is not supported by its faults (labeling.support); null: supported.
    ("flag", pa.string()),
])
# Data repair: real training images inside a failure region whose dataset label differs from the
# region's label (``row``: its index in the training split), and the decisions taken on them.
PROPOSALS_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("row", pa.int64()), ("region_id", pa.int64()), ("dataset_label", pa.string()),
    ("proposed_label", pa.string()), ("image", pa.binary()),
    # The image's log density under its region's Gaussian: proposals are listed most typical first.
    ("score", pa.float64()),
])
RELABELS_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("label", pa.string()), ("accepted", pa.bool_()), ("source", pa.string()),
    ("annotator", pa.string()), ("time", pa.float64()),
    # Decided by its region's row (one decision for all the region's proposals), not one by one.
    ("by_region", pa.bool_()),
])


# Counterfactual captions written for every search image before regeneration (strategy
# counterfactual with ``llm_processor``): the ``Rewrite`` fields, lists and dicts as JSON.
REWRITES_SCHEMA = pa.schema([
    ("source_id", pa.string()), ("caption", pa.string()), ("words", pa.string()), ("alternatives", pa.string()),
    ("edits", pa.string()), ("captions", pa.string()), ("valid", pa.bool_()), ("error", pa.string()),
    ("answer", pa.string()), ("calls", pa.int64()),
])


@dataclass(frozen=True)
class Stage:
    """One part of a run's folder: where it lives, what it holds and what makes it.

    ``path`` is relative to the run. A stage with a ``schema`` holds Parquet tables (read back sorted by
    ``row_order`` when Ray wrote them); ``marked`` stages finish with a completion marker, the others
    (a JSON file, the report) are replaced atomically whole.
    """

    name: str
    path: str
    made_by: str
    schema: pa.Schema | None = None
    row_order: str | None = None
    marked: bool = True
    optional: bool = False  # made by some runs only: listed once it exists


# Every part of a run, in the order a campaign and its follow-ups make them. The one place that
# names them: stores, status listings, resumption and the report all read this table.
LAYOUT = {s.name: s for s in (
    # Made before identify's shards when the counterfactual strategy writes through Ray Data's LLM processor.
    Stage("rewrites", "rewrites", "genstress run (counterfactual with llm_processor)", REWRITES_SCHEMA,
          optional=True),
    Stage("identify", "identify", "genstress run", SAMPLES_SCHEMA, "sample_id"),
    Stage("regions", "regions", "genstress run", REGIONS_SCHEMA),
    Stage("region_samples", "region_samples", "genstress run", REGION_SAMPLES_SCHEMA, "sample_id"),
    Stage("labels", "labels", "genstress label", LABELS_SCHEMA),
    # Relabelling proposals for D's training images (with a CSV and Label Studio tasks), and decisions.
    Stage("proposals", "repair/proposals", "genstress repair", PROPOSALS_SCHEMA, "sample_id"),
    Stage("relabels", "repair/relabels", "genstress repair", RELABELS_SCHEMA, "sample_id"),
    # Fresh samples of every failure region, made with its label (fine-tune and test sets).
    Stage("region_sets", "region_sets", "genstress correct", REGION_SAMPLES_SCHEMA, "sample_id"),
    # One row per trial (method, lambda); results.json and the selected weights beside them.
    Stage("correction", "correction", "genstress correct"),
    Stage("assessment", "assessment.json", "genstress assess", marked=False),
    Stage("report", "report", "genstress report", marked=False),
)}
# The stages ``genstress run`` makes, in order (``--until`` takes these).
STAGES = tuple(name for name, s in LAYOUT.items() if s.made_by == "genstress run")
# Files inside stages.
CORRECTION_RESULTS = "results.json"
REPORT_PAGE = "index.html"


def sample_id(strategy: str, seed: int, source: object, draw: int) -> str:
    """The deterministic id of a generated row, ``<strategy>:<seed>:<source>:<draw>``: the same
    config always makes the same ids, so counts can be checked exactly and reruns never duplicate.

    >>> sample_id("defuse", 0, "digits:test:12", 3)
    'defuse:0:digits:test:12:3'
    """
    return f"{strategy}:{seed}:{source}:{draw}"


def _layout(stage: str) -> Stage:
    if stage not in LAYOUT:
        raise KeyError(f"unknown stage {stage!r}; a run holds: {', '.join(LAYOUT)}")
    return LAYOUT[stage]


class StorageError(OSError):
    """An output or input location could not be used. The message names the URI."""


NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_name(field: str, value: str) -> str:
    """A campaign, run or scan name: one folder name of letters, digits, ``.``, ``_`` and ``-``.
    ``.`` and ``..`` match that but name the output itself or a folder above it, so they are refused.

    >>> check_name("run_id", "nightly-01")
    'nightly-01'
    """
    if not isinstance(value, str) or not NAME.fullmatch(value) or value in (".", ".."):
        raise StorageError((f"{field} " if field else "") +
                           f"{value!r} is not a name: letters, digits, '.', '_' and '-', and not '.' or '..'")
    return value


class StageError(RuntimeError):
    """A stage of a run failed; nothing of it was marked complete. ``fault`` is its root cause; when it
    is ``resumable`` (a full disk, an unreachable endpoint, a lost node), the same command resumes once
    the cause is gone."""

    def __init__(self, stage: str, run_uri: str, cause: BaseException):
        self.stage, self.run_uri, self.fault = stage, run_uri, root_cause(cause)
        super().__init__(f"stage {stage} of run {run_uri} failed: {self.fault}")


def filesystem_for(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for ``uri`` (local path, ``file://``, ``s3://``, ...).

    For ``s3://`` the endpoint comes from ``storage_options["endpoint_url"]`` or, failing that, the
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` environment variables read here on the driver, so the
    filesystem object shipped to Ray workers carries it.

    >>> fs, path = filesystem_for("/tmp/genstress")
    >>> path
    '/tmp/genstress'
    """
    opts = dict(storage_options or {})
    protocol = fsspec.utils.get_protocol(uri)
    if protocol in ("s3", "s3a") and "endpoint_url" not in opts:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
    try:
        fs, path = fsspec.core.url_to_fs(uri, **opts)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open {uri!r}: {exc}") from exc
    return fs, path


def default_cache() -> str:
    """Where built-in models (and copies of remote diffusers folders) are cached: ``$GENSTRESS_CACHE``,
    else ``~/.cache/genstress_ray``."""
    return os.environ.get("GENSTRESS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "genstress_ray"))


def resolve_uri(uri: str) -> str:
    """A local path made absolute against this process's working directory; any other URI unchanged.

    Ray workers (and Ray Tune trials) run in other working directories, so a relative path that the
    driver hands them would name another place. Every path is resolved once, where it enters.

    >>> resolve_uri("s3://bucket/runs")
    's3://bucket/runs'
    >>> resolve_uri("/tmp/x/../runs")
    '/tmp/runs'
    """
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"{uri!r} is not a location: give a folder or a URI")
    if fsspec.utils.get_protocol(uri) == "file" and not uri.startswith("file://"):
        return os.path.abspath(os.path.expanduser(uri))
    return uri


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """All bytes of one file at any fsspec URI, with an error that names it."""
    fs, path = filesystem_for(uri, storage_options)
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError, PermissionError, OSError) as exc:
        raise StorageError(f"cannot read {uri!r}: {exc}") from exc


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so readers see the old file or the new one, never a torn one."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def write_shard(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, counts: dict[str, Any],
                made_by: dict[str, Any] | None = None) -> None:
    """One shard's rows as one Parquet file, its counts (and ``made_by``: which node and how long) in
    the file's metadata, written atomically: a shard is there whole or not at all, and writing it
    again (a retried task) replaces it."""
    meta = {**(table.schema.metadata or {}), SHARD_COUNTS: json.dumps(counts).encode(),
            SHARD_MADE_BY: json.dumps(made_by or {}).encode(), FILE_ROWS: str(table.num_rows).encode()}
    buf = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(meta), buf)
    write_bytes_atomic(fs, path, buf.getvalue().to_pybytes())


def read_shard_counts(fs: fsspec.AbstractFileSystem, path: str, key: bytes = SHARD_COUNTS) -> dict[str, Any]:
    """A shard file's counts (or, with ``key=SHARD_MADE_BY``, where it was computed)."""
    with fs.open(path, "rb") as f:
        meta = pq.read_metadata(f).metadata or {}
    return json.loads(meta.get(key, b"{}"))


def sum_counts(parts) -> dict[str, Any]:
    """Counts of several shards: numbers added, lists (first names of skipped images) joined, up to 5.

    >>> sum_counts([{"candidates": 2, "unreadable_first": ["a"]}, {"candidates": 3}])
    {'candidates': 5, 'unreadable_first': ['a']}
    """
    total: dict[str, Any] = {}
    for counts in parts:
        for key, value in counts.items():
            if isinstance(value, list):
                total[key] = (total.get(key, []) + value)[:5]
            else:
                total[key] = total.get(key, 0) + value
    return total


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("genstress-ray", "torch", "ray", "numpy", "pyarrow", "scikit-learn", "diffusers", "fsspec", "s3fs"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _row_damage(metadata: pq.FileMetaData) -> str | None:
    """Why a Parquet file does not hold the rows recorded when it was written; None when it does (or
    when it was written before row counts were recorded)."""
    recorded = (metadata.metadata or {}).get(FILE_ROWS)
    if recorded is None:
        return None
    try:
        written = int(recorded)
    except ValueError:
        return "its recorded row count is unreadable"
    return None if written == metadata.num_rows else f"holds {metadata.num_rows} rows, written with {written}"


class RunStore:
    """One run's folder: stage tables, completion markers and the manifest.

    Example:
        >>> store = RunStore("/tmp/genstress-doc", "demo", "r1")
        >>> store.uri
        '/tmp/genstress-doc/demo/r1'
    """

    def __init__(self, output: str, campaign: str, run_id: str, storage_options: dict | None = None):
        self.output = resolve_uri(output).rstrip("/")
        self.campaign = check_name("campaign", campaign)
        self.run_id = check_name("run_id", run_id)
        self.storage_options = storage_options or {}
        self.uri = f"{self.output}/{campaign}/{run_id}"
        self.fs, self.path = filesystem_for(self.uri, self.storage_options)

    @classmethod
    def from_uri(cls, run_uri: str, storage_options: dict | None = None) -> "RunStore":
        """The store of an existing run, from its URI ``<output>/<campaign>/<run_id>``."""
        parts = run_uri.rstrip("/").rsplit("/", 2)
        if len(parts) != 3 or not all(parts):
            raise StorageError(f"{run_uri!r} is not a run URI (<output>/<campaign>/<run_id>)")
        store = cls(parts[0], parts[1], parts[2], storage_options)
        if not store.fs.exists(f"{store.path}/{MANIFEST}"):
            raise StorageError(f"{run_uri!r} holds no run (no {MANIFEST})")
        return store

    # ---- locations -------------------------------------------------------------------------
    def stage_path(self, stage: str) -> str:
        """The in-filesystem path of a stage of ``LAYOUT`` (a KeyError names the known ones)."""
        return f"{self.path}/{_layout(stage).path}"

    def stage_uri(self, stage: str, *parts: str) -> str:
        """The URI of a stage, or of a file inside it: ``store.stage_uri("report", REPORT_PAGE)``."""
        return "/".join((self.uri, _layout(stage).path, *parts))

    def read_json(self, stage: str, *parts: str) -> dict:
        """A JSON file of the run: a stage that is one file (``assessment``) or a file inside a stage."""
        return json.loads(self.fs.cat_file("/".join((self.stage_path(stage), *parts))))

    def write_json(self, stage: str, data: dict, *parts: str) -> str:
        """Write a JSON file of the run atomically (see ``read_json``); returns its URI."""
        path = "/".join((self.stage_path(stage), *parts))
        if parts:
            self.fs.makedirs(self.stage_path(stage), exist_ok=True)
        write_bytes_atomic(self.fs, path, json.dumps(data, indent=2, default=float).encode())
        return self.stage_uri(stage, *parts)

    def arrow_filesystem(self) -> pafs.FileSystem:
        """The same filesystem as a pyarrow one, for Ray Data's Parquet writer and pyarrow readers."""
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def remove(self, path: str) -> None:
        """Delete ``path`` (recursively) after checking that it lies inside this run's folder."""
        inside = posixpath.normpath(path)
        if not inside.startswith(posixpath.normpath(self.path) + "/"):
            raise StorageError(f"refusing to delete {path!r}: it is not inside the run folder {self.uri!r}")
        self.fs.rm(path, recursive=True)

    def check_writable(self) -> None:
        """Fail early, before any work, when the output cannot be written."""
        probe = f"{self.path}/.write-probe-{uuid.uuid4().hex}"
        try:
            self.fs.makedirs(self.path, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm(probe)
        except Exception as exc:  # every backend raises its own kinds
            raise StorageError(f"output {self.uri!r} is not writable: {exc}") from exc

    # ---- stage state -----------------------------------------------------------------------
    def parquet_files(self, stage: str) -> list[str]:
        """The paths of a stage's Parquet files (markers and other files left out)."""
        # Ray workers write behind the driver's back; s3fs would otherwise answer from a stale listing.
        self.fs.invalidate_cache(self.stage_path(stage))
        if not self.fs.exists(self.stage_path(stage)):
            return []
        return sorted(p for p in self.fs.ls(self.stage_path(stage), detail=False) if p.endswith(".parquet"))

    def is_complete(self, stage: str) -> bool:
        self.fs.invalidate_cache(self.stage_path(stage))
        return self.fs.exists(f"{self.stage_path(stage)}/{MARKER}")

    def marker(self, stage: str) -> dict:
        return json.loads(self.fs.cat_file(f"{self.stage_path(stage)}/{MARKER}"))

    def begin_stage(self, stage: str) -> str:
        """Clear whatever an interrupted attempt left and return the stage's path."""
        path = self.stage_path(stage)
        if self.fs.exists(path):
            self.remove(path)
        self.fs.makedirs(path, exist_ok=True)
        return path

    def resume_stage(self, stage: str) -> dict[str, str]:
        """Open a stage written shard by shard, keeping the shards an interrupted attempt finished;
        returns them, ``{shard name: path}``. Anything else there (a half-written temporary file, a
        marker, files of another layout) is removed: shard files are written whole or not at all."""
        path = self.stage_path(stage)
        self.fs.makedirs(path, exist_ok=True)
        self.fs.invalidate_cache(path)
        for entry in self.fs.ls(path, detail=False) if self.fs.exists(path) else []:  # S3 has no empty folders
            name = posixpath.basename(entry.rstrip("/"))
            if not (name.startswith(SHARD_PREFIX) and name.endswith(".parquet")):
                self.remove(entry)
        return self.shard_files(stage)

    def reopen_stage(self, stage: str, files: list[str]) -> None:
        """Mark a finished stage unfinished again, deleting ``files`` (damaged ones), so that a rerun
        computes them again and keeps the rest."""
        self.remove(f"{self.stage_path(stage)}/{MARKER}")
        for path in files:
            self.remove(path)

    def shard_files(self, stage: str) -> dict[str, str]:
        """``{shard name: path}`` of the shard files a stage holds."""
        return {posixpath.basename(p)[len(SHARD_PREFIX): -len(".parquet")]: p for p in self.parquet_files(stage)
                if posixpath.basename(p).startswith(SHARD_PREFIX)}

    def shard_path(self, stage: str, shard: str) -> str:
        return f"{self.stage_path(stage)}/{SHARD_PREFIX}{shard}.parquet"

    def shard_counts(self, stage: str, shards: list[str]) -> dict[str, Any]:
        """The counts stored in each of ``shards``' files, summed (lists joined); a StageError-worthy
        StorageError names a shard that is missing."""
        files = self.shard_files(stage)
        missing = [s for s in shards if s not in files]
        if missing:
            raise StorageError(f"stage {stage} of {self.uri}: {len(missing)} shard(s) missing after the stage ran "
                               f"({', '.join(missing[:5])})")
        return sum_counts(read_shard_counts(self.fs, files[s]) for s in shards)

    def complete_stage(self, stage: str, info: dict) -> None:
        write_bytes_atomic(self.fs, f"{self.stage_path(stage)}/{MARKER}",
                           json.dumps({**info, "completed_at": time.time()}).encode())

    # ---- tables ----------------------------------------------------------------------------
    def write_table(self, stage: str, table: pa.Table) -> None:
        """Write a small driver-side table as the stage's single Parquet file."""
        buf = pa.BufferOutputStream()
        pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                      FILE_ROWS: str(table.num_rows).encode()}), buf)
        write_bytes_atomic(self.fs, f"{self.stage_path(stage)}/part-00000.parquet", buf.getvalue().to_pybytes())

    def read_table(self, stage: str, columns: list[str] | None = None, filter=None) -> pa.Table:
        """Read a finished stage's Parquet files (only ``*.parquet``; markers are skipped).

        A stage that wrote no rows reads as an empty table with its schema's columns.
        """
        files = self.parquet_files(stage)
        schema = _layout(stage).schema
        if not files:
            empty = schema.empty_table() if schema is not None else pa.table({})
            return empty.select(columns) if columns else empty
        # Read as the declared schema (a file is as writable as the bucket: a column rewritten as text
        # must not reach a page or a computation), a file that does not fit refused by name.
        dataset = pads.dataset(files, format="parquet", filesystem=self.arrow_filesystem(), schema=schema)
        try:  # the footers, read once and kept for the scan
            damaged = {f.path: why for f in dataset.get_fragments() if (why := _row_damage(f.metadata))}
        except (pa.ArrowInvalid, OSError) as exc:
            raise self._misfit(stage, files, exc) from None
        if damaged:
            raise self._damage_error(stage, damaged)
        key = _layout(stage).row_order
        wanted = columns if key is None or columns is None or key in columns else [*columns, key]
        try:
            table = dataset.to_table(columns=wanted, filter=filter)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError) as exc:
            raise self._misfit(stage, files, exc) from None
        if key is None:
            return table
        # Ray writes a stage's files and rows in whatever order its tasks finish. Sorted rows make
        # everything read downstream (region fits, samples drawn for labels and correction, metrics)
        # the same for the same config, however the stage was run.
        table = table.sort_by(key)
        return table if wanted is columns else table.drop_columns([key])

    def damaged_files(self, stage: str) -> dict[str, str]:
        """The stage's Parquet files that do not hold what was written (path -> why): unreadable, or
        fewer or more rows than recorded when written. Files written before row counts were recorded
        are trusted as they are."""
        damaged, fs = {}, self.arrow_filesystem()
        for path in self.parquet_files(stage):
            try:
                why = _row_damage(pq.read_metadata(path, filesystem=fs))
            except (pa.ArrowInvalid, OSError):
                why = "not a readable Parquet file"
            if why:
                damaged[path] = why
        return damaged

    def _damage_error(self, stage: str, damaged: dict[str, str]) -> StorageError:
        listed = "; ".join(f"{path}: {why}" for path, why in list(damaged.items())[:3])
        more = f" (and {len(damaged) - 3} more)" if len(damaged) > 3 else ""
        redo = ("rerun `genstress run` with the run's config to recompute them" if _layout(stage).made_by ==
                "genstress run" else f"rerun {_layout(stage).made_by}")
        return StorageError(f"the {stage} stage of {self.uri} is damaged: {listed}{more}; {redo}")

    def _misfit(self, stage: str, files: list[str], exc: BaseException) -> StorageError:
        """Which of a stage's files could not be read as its schema, and why (``exc``: what the read raised)."""
        schema, fs = _layout(stage).schema, self.arrow_filesystem()
        for path in files:
            try:
                found = pq.read_schema(path, filesystem=fs)
            except (pa.ArrowInvalid, OSError) as bad:
                return StorageError(f"{path}: not a readable Parquet file ({bad}); the {stage} stage is damaged: "
                                    f"rerun the command that made it ({_layout(stage).made_by})")
            for field in schema or []:
                if field.name in found.names and not found.field(field.name).type.equals(field.type):
                    try:
                        pq.read_table(path, columns=[field.name], filesystem=fs).column(0).cast(field.type)
                    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                        return StorageError(f"{path}: column {field.name!r} is {found.field(field.name).type}, not "
                                            f"{field.type} as a {stage} table's is; the file was not written by "
                                            "genstress or was changed since")
        return StorageError(f"cannot read the {stage} stage of {self.uri}: {exc}")

    def count_rows(self, stage: str, filter=None) -> int:
        files = self.parquet_files(stage)
        if not files:
            return 0
        return pads.dataset(files, format="parquet", filesystem=self.arrow_filesystem()).count_rows(filter=filter)

    # ---- manifest --------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        """The run's manifest, or ``{}`` when the run has none yet; a StorageError when it cannot be read."""
        path = f"{self.path}/{MANIFEST}"
        self.fs.invalidate_cache(self.path)
        try:
            if not self.fs.exists(path):
                return {}
            manifest = json.loads(self.fs.cat_file(path))
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {self.uri}/{MANIFEST}: {exc}") from exc
        if not isinstance(manifest, dict):
            raise StorageError(f"{self.uri}/{MANIFEST} is not a JSON object")
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write the whole manifest atomically (readers see the old one or the new one)."""
        self.fs.makedirs(self.path, exist_ok=True)
        write_bytes_atomic(self.fs, f"{self.path}/{MANIFEST}", json.dumps(manifest, indent=2, default=str).encode())

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into the existing manifest.json (dicts one level deep) and write it whole.

        Never merges into an absent or unreadable manifest: a run whose manifest vanished (an object
        store that lost data) stops with a StorageError instead of writing a manifest that has lost
        the config, classes and models that made its tables.
        """
        manifest = self.read_manifest()
        if not manifest.get("config"):
            raise StorageError(f"{self.uri}/{MANIFEST} is missing or lost its config: not writing a partial "
                               "manifest; check the storage, then rerun the same command to resume")
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(manifest.get(key), dict):
                manifest[key] = {**manifest[key], **value}
            else:
                manifest[key] = value
        self.write_manifest(manifest)
        return manifest
