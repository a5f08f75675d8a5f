"""What a run folder says about itself, and what may be taken from it.

- A run id means one config: ``config_differences`` names the fields where a rerun's config differs
  from the one that made the run's tables (``RELOCATABLE`` fields may differ: they say where and on
  what resources the run goes, not what it computes).
- Nothing read from a run folder names code to import: ``run_config`` refuses a manifest whose config
  names a ``factory`` unless the user supplies that config again.
- ``list_runs`` and ``run_status`` are ``genstress runs`` and ``genstress status``.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from genstress_ray.config import CampaignConfig, ConfigError, load_config
from genstress_ray.lease import describe, holder_gone, read_lease
from genstress_ray.storage import LAYOUT, MANIFEST, RunStore, StorageError, filesystem_for, resolve_uri

# Top-level fields a rerun may change: where the run is written and on what resources it runs (and
# the checks that gate it, which change nothing it computes).
RELOCATABLE = ("output", "run_id", "resources", "ray", "storage_options", "checks")
# Fields earlier versions wrote that this one no longer has, dropped from a stored config when it is
# read: (section, field).
RETIRED = (("correction", "real_region_label"),)  # real members are scored against their own labels now


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ (``RELOCATABLE`` top-level fields excepted).

    >>> config_differences({"strategy": {"draws": 50}, "output": "/a"}, {"strategy": {"draws": 20}, "output": "/b"})
    ['strategy.draws (50 -> 20)']
    """
    out = []
    for key in sorted(set(old) | set(new)):
        if not prefix and key in RELOCATABLE:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} -> {b!r})" if not (isinstance(a, dict) or isinstance(b, dict))
                       else f"{prefix}{key}")
    return out


def config_fingerprint(raw: dict[str, Any]) -> str:
    """A short hash of what a config computes (``RELOCATABLE`` fields left out), kept in each stage's
    completion marker: a rerun adopts only stages its own config made, even when the manifest is gone.

    >>> config_fingerprint({"seed": 0, "output": "/a"}) == config_fingerprint({"seed": 0, "output": "/b"})
    True
    """
    kept = {k: v for k, v in raw.items() if k not in RELOCATABLE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def manifest_config(store: RunStore, manifest: dict) -> dict[str, Any]:
    """The config a run was made with; a StorageError when its manifest has none (never started, or lost)."""
    if not manifest.get("config"):
        raise StorageError(f"{store.uri}/{MANIFEST} holds no config: the run was not started, or its manifest "
                           "was lost (its tables cannot be traced to what made them)")
    raw = dict(manifest["config"])
    for section, name in RETIRED:
        if isinstance(raw.get(section), dict) and name in raw[section]:
            raw[section] = {k: v for k, v in raw[section].items() if k != name}
    return raw


def with_current_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored config as this version's schema reads it: a field added since the run was made takes
    its default, so it is no difference. A config this version no longer accepts stays as stored."""
    try:
        return load_config(raw).model_dump(mode="json")
    except ConfigError:
        return raw


def refuse_differences(old: dict[str, Any], new: dict[str, Any], what: str, hint: str = "") -> None:
    """A ConfigError ``<what>; it differs in: <fields>`` when the configs differ beyond ``RELOCATABLE``
    (``old``, a stored config, is read with this version's defaults first)."""
    differences = config_differences(with_current_defaults(old), new)
    if differences:
        raise ConfigError(f"{what}; it differs in: {', '.join(differences)}{hint}")


def named_code(raw: Any, prefix: str = "") -> dict[str, str]:
    """Every ``factory`` (an import path) a config names, by field."""
    found = {}
    if isinstance(raw, dict):
        for key, value in raw.items():
            if key == "factory" and value:
                found[f"{prefix}{key}"] = str(value)
            else:
                found.update(named_code(value, f"{prefix}{key}."))
    return found


def run_config(store: RunStore, config=None, manifest: dict | None = None) -> CampaignConfig:
    """The config that made the run in ``store``, safe to act on.

    Args:
        store: the run.
        config: the campaign's config as the user has it (a YAML path, dict or ``CampaignConfig``);
            needed when the run's config names code to import (a ``factory``), and then it must
            match the run's config (relocatable fields aside).
        manifest: the manifest, when the caller has read it already.

    Raises:
        ConfigError: the manifest names code and no matching config was given.
    """
    manifest = store.read_manifest() if manifest is None else manifest
    raw = manifest_config(store, manifest)
    if config is not None:
        refuse_differences(raw, load_config(config).model_dump(mode="json"),
                           f"--config is not the config of run {store.uri}")
    elif named_code(raw):
        code = ", ".join(f"{k}: {v!r}" for k, v in named_code(raw).items())
        raise ConfigError(f"run {store.uri} names code to import ({code}); code is never imported from a run "
                          "folder, which anyone with write access to the storage can change. Pass the campaign's "
                          "own config with --config (Python: config=) to confirm it")
    return load_config(raw)


def with_overrides(cfg: CampaignConfig, section: str, overrides: dict | None) -> CampaignConfig:
    """``cfg`` with fields of one section replaced (``genstress correct --lambdas``), validated."""
    if not overrides:
        return cfg
    raw = cfg.model_dump(mode="json")
    raw[section] = {**raw.get(section, {}), **overrides}
    return load_config(raw)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def run_status(store: RunStore, manifest: dict | None = None, check_files: bool = True) -> dict[str, Any]:
    """One run's state: status, stages done (with their row counts), lease holder, and what a rerun
    of ``genstress run`` would do for each stage. ``check_files``: read every table file's footer to
    find damaged ones (a listing of many runs leaves it out)."""
    manifest = store.read_manifest() if manifest is None else manifest
    stages = {}
    for stage, command, optional in ((s.name, s.made_by, s.optional) for s in LAYOUT.values() if s.marked):
        if store.is_complete(stage):
            marker = store.marker(stage)
            rows = {k: v for k, v in marker.items() if isinstance(v, int) and not isinstance(v, bool)}
            damaged = store.damaged_files(stage) if check_files else {}
            redo = "computed again by a rerun" if command == "genstress run" else f"rerun {command}"
            stages[stage] = {"done": True, "rows": rows, "damaged": damaged,
                             "next": f"{len(damaged)} damaged file(s), {redo}" if damaged else "kept (finished)"}
        elif not optional:
            stages[stage] = {"done": False, "next": f"made by {command}"}
    lease = read_lease(store.fs, store.path)
    if lease is not None and holder_gone(lease):
        lease = None
    created = manifest.get("created_at")
    status = manifest.get("status", "unknown")
    if status == "running" and lease is None:
        # The manifest says running, but no live driver holds the run: it died (or was killed).
        status = "interrupted (its driver is gone; rerun to resume)"
    return {"uri": store.uri, "campaign": manifest.get("campaign", store.campaign),
            "run_id": manifest.get("run_id", store.run_id), "status": status,
            "age": _age(time.time() - created) if created else "?", "stages": stages,
            "lease": describe(lease) if lease else None, "row_counts": manifest.get("row_counts", {})}


def list_runs(output: str, storage_options: dict | None = None) -> list[dict[str, Any]]:
    """Every run under ``output`` (``<output>/<campaign>/<run_id>/manifest.json``), newest first."""
    output = resolve_uri(output).rstrip("/")
    fs, path = filesystem_for(output, storage_options)
    if not fs.exists(path):
        raise StorageError(f"{output!r} does not exist")
    runs = []
    for manifest_path in fs.glob(f"{path}/*/*/{MANIFEST}"):
        campaign, run_id = manifest_path.rsplit("/", 3)[1:3]
        store = RunStore(output, campaign, run_id, storage_options)
        try:
            manifest = store.read_manifest()
        except StorageError as exc:
            runs.append({"uri": store.uri, "campaign": campaign, "run_id": run_id, "status": f"unreadable: {exc}",
                         "stages": {}, "lease": None, "age": "?", "row_counts": {}, "created_at": 0})
            continue
        runs.append({**run_status(store, manifest, check_files=False), "created_at": manifest.get("created_at", 0)})
    return sorted(runs, key=lambda r: -r["created_at"])
