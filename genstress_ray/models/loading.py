"""Loading model weights from any fsspec URI without unpickling arbitrary objects.

Formats: TorchScript archives, safetensors files, plain state dicts read with
``torch.load(weights_only=True)``, and model folders (``models.folders``): diffusers (Stable
Diffusion, an AutoencoderKL) and transformers image classifiers. For state dicts the architecture comes from the registry
(``architecture`` + ``params``), a user factory (``"package.module:function"``), or, for checkpoints
this project wrote, from the safetensors metadata.
"""

from __future__ import annotations

import importlib
import io
import json
import zipfile
from typing import Any, Callable

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from genstress_ray.models.folders import folder_format, load_diffusers, load_transformers_classifier
from genstress_ray.models.protocols import ModelError, load_failure
from genstress_ray.models.registry import get_model
from genstress_ray.storage import StorageError, filesystem_for, read_bytes, write_bytes_atomic

FORMATS = ("auto", "torchscript", "safetensors", "state_dict", "diffusers", "transformers")
_META_KEY = "genstress"


def import_factory(path: str) -> Callable[..., nn.Module]:
    """Resolve ``"package.module:function"`` to the callable."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"factory {path!r} must look like 'package.module:function'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"factory {path!r} cannot be imported: {exc}") from exc


def _zip_entries(data: bytes) -> list[str]:
    try:
        return zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile:
        return []


def _guess_format(uri: str, data: bytes) -> str:
    if uri.endswith(".safetensors") or _looks_like_safetensors(data):
        return "safetensors"
    # TorchScript and torch.save both write zip archives; TorchScript's holds its code and a
    # constants.pkl (entries listed in the archive's directory at its end: the tensors come first,
    # so a look at the first bytes misses them in any model of size).
    entries = _zip_entries(data) if data[:2] == b"PK" else []
    if any(e.endswith("/constants.pkl") for e in entries) and any("/code/" in e for e in entries):
        return "torchscript"
    return "state_dict"


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    header_len = int.from_bytes(data[:8], "little")
    return 0 < header_len <= len(data) - 8 and data[8:9] == b"{"


def _describe(data: bytes) -> str:
    """What a file that loads as no checkpoint looks like, for the error message."""
    if not data:
        return "an empty file"
    if data[:2] == b"PK":
        entries = _zip_entries(data)
        return f"a zip archive with {len(entries)} entries ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''})"
    # Never the file's contents: error messages end up in job logs, and the path could name a secret.
    head = data[:64]
    printable = sum(32 <= c < 127 or c in (9, 10, 13) for c in head) / len(head)
    return f"a text file of {len(data)} bytes" if printable > 0.95 else f"{len(data)} bytes of binary data"


def save_checkpoint(module: nn.Module, uri: str, architecture: str, params: dict, extra: dict | None = None) -> None:
    """Write ``module``'s weights as safetensors with enough metadata to rebuild it from the registry."""
    meta = {"architecture": architecture, "params": params, **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    data = save_safetensors(state, metadata={_META_KEY: json.dumps(meta)})
    fs, path = filesystem_for(uri)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    write_bytes_atomic(fs, path, data)


def load_module(uri: str, fmt: str = "auto", architecture: str | None = None, factory: str | None = None,
                params: dict | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a module and its metadata (empty unless the checkpoint carries some) from ``uri``.

    A transformers classifier's metadata holds its ``class_names`` and ``input`` spec.

    Example:
        >>> module, meta = load_module("/tmp/model.safetensors")  # doctest: +SKIP
    """
    if fmt not in FORMATS:
        raise ModelError(f"format: unknown checkpoint format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = folder_format(uri) or fmt
    if fmt == "diffusers":
        return load_diffusers(uri, params), {}
    if fmt == "transformers":
        return load_transformers_classifier(uri)
    try:
        data = read_bytes(uri)
    except StorageError as exc:
        raise ModelError(f"checkpoint {uri!r} cannot be read: {exc}") from exc
    guessed = fmt == "auto"
    fmt = _guess_format(uri, data) if guessed else fmt
    meta: dict[str, Any] = {}
    try:
        if fmt == "torchscript":
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
            return module.eval(), meta
        if fmt == "safetensors":
            state = load_safetensors(data)
            meta = json.loads(_safetensors_metadata(data).get(_META_KEY, "{}"))
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
    except ModelError:
        raise
    except Exception as exc:
        how = f"format auto: read as {fmt}" if guessed else f"format {fmt}"
        raise ModelError(f"checkpoint {uri!r} is not a model checkpoint ({how} failed: {load_failure(exc)}); "
                         f"it is {_describe(data)}. Formats: TorchScript (.pt), safetensors, a torch.save "
                         "state dict, a diffusers or transformers model folder") from exc
    architecture = architecture or meta.get("architecture")
    params = {**meta.get("params", {}), **(params or {})}
    if factory:
        module = import_factory(factory)(**params)
    elif architecture:
        module = get_model(architecture, **params)
    else:
        raise ModelError(f"checkpoint {uri!r} is a bare {fmt} state dict: name its 'architecture' or 'factory'")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise ModelError(f"checkpoint {uri!r} does not match architecture "
                         f"{factory or architecture} {params}: {' '.join(first)}") from exc
    return module.eval(), meta


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8: 8 + header_len]).get("__metadata__", {}) or {}
