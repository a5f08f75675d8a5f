"""A model registry as a folder (or object-storage prefix) of versions, for nightly scans of the newest.

    <registry>/<version>/            one folder per version
        <checkpoint>                 a .safetensors / .pt / .pth / .ts file, or the version folder itself
                                     is a transformers model folder (config.json)
        metadata.json                optional: {"created": ISO time, "checkpoint": file name, ...}

Versions are ordered by ``created`` when every version has one, else by their names compared as
numbers where they are digits (v2 < v10, 1.9.0 < 1.10.0). Metadata is data: nothing in it names code.

Example:
    >>> newest_version("s3://models/digits-cnn").uri  # doctest: +SKIP
    's3://models/digits-cnn/v3/model.safetensors'
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from genstress_ray.models.folders import folder_format
from genstress_ray.models.protocols import ModelError
from genstress_ray.storage import filesystem_for

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ts")
METADATA = "metadata.json"


@dataclass(frozen=True)
class ModelVersion:
    version: str
    uri: str
    created: datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _natural(name: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def _created(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        raise ModelError(f"{where}: created {value!r} is not an ISO date-time (e.g. 2026-12-06T02:00:00)") from None


def _version(fs, path: str, uri: str) -> ModelVersion:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    where = f"{uri.rstrip('/')}/{name}"
    entries = {p.rstrip("/").rsplit("/", 1)[-1]: p for p in fs.ls(path, detail=False)}
    metadata: dict[str, Any] = {}
    if METADATA in entries:
        try:
            metadata = json.loads(fs.cat_file(entries[METADATA]))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{where}/{METADATA} cannot be read as JSON: {exc}") from None
        if not isinstance(metadata, dict):
            raise ModelError(f"{where}/{METADATA} must hold an object, got {type(metadata).__name__}")
    if "checkpoint" in metadata:
        chosen = str(metadata["checkpoint"])
        if chosen not in entries or "/" in chosen:
            raise ModelError(f"{where}/{METADATA}: checkpoint {chosen!r} is not a file of that version")
        checkpoint = f"{where}/{chosen}"
    elif "config.json" in entries and folder_format(where) == "transformers":
        checkpoint = where
    else:
        found = sorted(n for n in entries if n.endswith(CHECKPOINT_SUFFIXES))
        if len(found) != 1:
            raise ModelError(f"{where}: {'no checkpoint' if not found else f'several checkpoints {found}'}; a version "
                             f"holds one {'/'.join(CHECKPOINT_SUFFIXES)} file, a transformers folder, or a "
                             f"{METADATA} naming its checkpoint")
        checkpoint = f"{where}/{found[0]}"
    return ModelVersion(name, checkpoint, _created(metadata.get("created"), f"{where}/{METADATA}"), metadata)


def list_versions(registry: str, storage_options: dict | None = None) -> list[ModelVersion]:
    """Every version in the registry, oldest first; a ModelError naming the registry when it cannot be
    read or holds none."""
    fs, root = filesystem_for(registry, storage_options)
    try:
        if not fs.isdir(root):
            raise ModelError(f"model registry {registry!r} is not a folder or prefix")
        folders = [p for p in fs.ls(root, detail=True) if p["type"] == "directory"]
    except OSError as exc:
        raise ModelError(f"model registry {registry!r} cannot be read: {exc}") from None
    versions = [_version(fs, p["name"], registry) for p in folders]
    if not versions:
        raise ModelError(f"model registry {registry!r} holds no versions (expected <registry>/<version>/<checkpoint>)")
    if all(v.created for v in versions):
        return sorted(versions, key=lambda v: (v.created, _natural(v.version)))
    return sorted(versions, key=lambda v: _natural(v.version))


def newest_version(registry: str, storage_options: dict | None = None) -> ModelVersion:
    """The registry's newest version (see ``list_versions`` for the order)."""
    return list_versions(registry, storage_options)[-1]
