"""Models that come as folders: Hugging Face ``transformers`` image classifiers and diffusers models.

A ``transformers`` folder (``config.json`` + weights + ``preprocessor_config.json``, what
``save_pretrained`` writes) loads through ``AutoModelForImageClassification``; its image-processor
config gives the input size and normalisation, its ``id2label`` the class names. A diffusers folder
is either a Stable Diffusion pipeline (``model_index.json`` or a ``unet/`` folder, loaded by
``diffusion_generators``) or
one ``AutoencoderKL`` (Stable Diffusion's VAE), which serves Defuse as a latent generator.

Nothing here runs code from the folder: weights load as safetensors or with ``weights_only``, and
``trust_remote_code`` stays off. Folders on object storage are copied to the local cache first.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

from genstress_ray.models.protocols import LOAD_ERRORS, ModelError, load_failure
from genstress_ray.storage import StorageError, default_cache, filesystem_for


def local_folder(uri: str, what: str = "model") -> Path:
    """A local copy of the folder at ``uri`` (the folder itself when it is local)."""
    fs, path = filesystem_for(uri)
    if isinstance(fs, LocalFileSystem):
        return Path(path)
    local = Path(default_cache()) / "folders" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (local / "_COMPLETE").exists():
        try:
            fs.get(path.rstrip("/") + "/", str(local), recursive=True)
        except (OSError, StorageError) as exc:
            raise ModelError(f"{what} folder {uri!r} cannot be copied: {exc}") from exc
        (local / "_COMPLETE").write_text(uri)
    return local


def check_transformers_folder(folder: Path, uri: str, what: str, kind: str, needed: tuple[str, ...]) -> None:
    """Fail early, naming the folder and what it lacks, when ``folder`` is not a ``save_pretrained`` folder
    with the files ``needed`` (``a|b``: either) and weights."""
    if not folder.is_dir():
        raise ModelError(f"{what} {uri!r} is not a folder (a transformers {kind} folder)")
    names = {p.name for p in folder.iterdir()}
    missing = [need.split("|")[0] for need in needed if not names & set(need.split("|"))]
    if not any(n.endswith((".safetensors", ".bin")) for n in names):
        missing.append("model.safetensors")
    if missing:
        raise ModelError(f"{what} folder {uri!r} lacks {', '.join(missing)} (save the model and its tokenizer or "
                         "processor there with save_pretrained)")


def load_transformers_folder(uri: str, what: str, kind: str, needed: tuple[str, ...], preprocessor, model,
                             device: str = "cpu") -> tuple[Any, nn.Module]:
    """A ``save_pretrained`` folder's preprocessor (tokenizer or processor) and model, loaded with the
    ``Auto*`` classes given, the model in eval mode on ``device``; a folder that lacks files or does not
    load is a ModelError naming it. Nothing is downloaded and nothing in the folder runs as code."""
    folder = local_folder(uri, what)
    check_transformers_folder(folder, uri, what, kind, needed)
    try:
        return (preprocessor.from_pretrained(folder, local_files_only=True),
                model.from_pretrained(folder, local_files_only=True).to(device).eval())
    except LOAD_ERRORS as exc:
        raise ModelError(f"{what} folder {uri!r} cannot be loaded: {load_failure(exc)}") from None


def folder_format(uri: str) -> str | None:
    """``transformers`` or ``diffusers`` for a model folder at ``uri``; None when ``uri`` is no folder."""
    fs, path = filesystem_for(uri)
    try:
        if not fs.isdir(path):
            return None
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    except OSError:
        return None
    if names & {"model_index.json", "unet"}:
        return "diffusers"
    if "config.json" in names:
        config = _json(fs.cat_file(f"{path.rstrip('/')}/config.json"), uri)
        return "diffusers" if "_class_name" in config else "transformers"
    raise ModelError(f"checkpoint {uri!r} is a folder without config.json or model_index.json: not a "
                     "transformers or diffusers model folder")


def _json(data: bytes, where: str) -> dict:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ModelError(f"{where}: config.json is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ModelError(f"{where}: config.json is not a JSON object")
    return value


# ---- transformers image classifiers ------------------------------------------------------------------
class LogitsOf(nn.Module):
    """A ``transformers`` classifier as a plain module: pixel values -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def load_transformers_classifier(uri: str) -> tuple[nn.Module, dict[str, Any]]:
    """An ``AutoModelForImageClassification`` folder, with its input spec and class names as metadata.

    Example:
        >>> net, meta = load_transformers_classifier("models/resnet-tiny")  # doctest: +SKIP
        >>> meta["input"], meta["class_names"][:2]  # doctest: +SKIP
        ({'shape': [3, 224, 224], 'resize': 256, 'mean': [...], 'std': [...]}, ['tench', 'goldfish'])
    """
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per actor and load: noise in the run's output
    folder = local_folder(uri, "transformers")
    try:
        model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True)
    except LOAD_ERRORS as exc:
        raise ModelError(f"transformers classifier {uri!r} failed to load: {load_failure(exc)}") from None
    config = model.config
    names = [str(config.id2label.get(i, i)) for i in range(config.num_labels)]
    meta = {"class_names": names, "input": transformers_input(folder, config, uri)}
    return LogitsOf(model).eval(), meta


def transformers_input(folder: Path, config, uri: str) -> dict[str, Any]:
    """The input spec (``InputSpec`` fields) from a folder's image-processor config.

    Handles the processors' two size forms: ``{"height", "width"}`` (ViT: resize straight to it) and
    ``{"shortest_edge"}`` with a centre crop (``crop_size``, or ConvNeXt/ResNet's ``crop_pct``).
    """
    channels = int(getattr(config, "num_channels", 3))
    path = folder / "preprocessor_config.json"
    if not path.exists():
        side = getattr(config, "image_size", None)
        if not isinstance(side, int):
            raise ModelError(f"transformers classifier {uri!r} has no preprocessor_config.json and no image_size "
                             "in its config: its input size is unknown")
        return {"shape": [channels, side, side]}
    proc = _json(path.read_bytes(), str(path))
    size, crop = proc.get("size", 224), proc.get("crop_size")
    size = {"height": size, "width": size} if isinstance(size, int) else dict(size)
    spec: dict[str, Any] = {}
    if "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        if proc.get("crop_pct"):  # ConvNeXt's processor: resize edge / crop_pct, crop edge
            spec = {"shape": [channels, edge, edge], "resize": int(edge / float(proc["crop_pct"]))}
        else:
            crop = {"height": crop, "width": crop} if isinstance(crop, int) else (crop or {"height": edge, "width": edge})
            spec = {"shape": [channels, int(crop["height"]), int(crop["width"])], "resize": edge}
    elif "height" in size and "width" in size:
        spec = {"shape": [channels, int(size["height"]), int(size["width"])]}
    else:
        raise ModelError(f"{path}: size {size} is neither {{height, width}} nor {{shortest_edge}}")
    if proc.get("do_normalize", True) and proc.get("image_mean") is not None:
        spec.update(mean=list(proc["image_mean"]), std=list(proc["image_std"]))
    return spec


# ---- diffusers AutoencoderKL as a latent generator -------------------------------------------------
class KLAutoencoder(nn.Module):
    """A diffusers ``AutoencoderKL`` behind the latent-generator protocol (``encode``/``decode``).

    Images in [0, 1] at ``image_size`` go to [-1, 1] and through the encoder; the latent posterior's
    mean and log-variance come out flat, scaled by the VAE's ``scaling_factor`` (the space Stable
    Diffusion works in). ``decode`` undoes both. ``LatentGenerator`` resizes the run's images to
    ``image_size`` and back, so the data may have any resolution.
    """

    def __init__(self, vae: nn.Module, resolution: int | None = None):
        super().__init__()
        cfg = vae.config
        self.vae = vae
        side = int(resolution or cfg.sample_size)
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if side % factor:
            raise ModelError(f"AutoencoderKL: resolution {side} is not a multiple of its downsampling factor {factor}")
        self.image_size = (int(cfg.in_channels), side, side)
        self.latent_shape = (int(cfg.latent_channels), side // factor, side // factor)
        self.scale = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(images * 2 - 1).latent_dist
        return dist.mean.flatten(1) * self.scale, dist.logvar.flatten(1) + 2 * math.log(self.scale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latents.reshape(len(latents), *self.latent_shape) / self.scale).sample
        return ((images + 1) / 2).clamp(0, 1)


def load_autoencoder_kl(uri: str, folder: Path, resolution: int | None = None) -> KLAutoencoder:
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    try:
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    except LOAD_ERRORS as exc:
        raise ModelError(f"AutoencoderKL folder {uri!r} failed to load: {load_failure(exc)}") from None
    return KLAutoencoder(vae.eval(), resolution).eval()


def load_diffusers(uri: str, params: dict | None = None) -> nn.Module:
    """A diffusers folder: Stable Diffusion's parts (``model_index.json``), or one ``AutoencoderKL``."""
    folder = local_folder(uri, "diffusers")
    config_path = folder / "config.json"
    if not config_path.exists():  # a pipeline folder (its loader names any component it lacks)
        from genstress_ray.models.diffusion_generators import load_stable_diffusion

        return load_stable_diffusion(uri)
    kind = _json(config_path.read_bytes(), str(config_path)).get("_class_name")
    if kind != "AutoencoderKL":
        raise ModelError(f"diffusers folder {uri!r} holds a {kind}; a folder of one model must be an AutoencoderKL "
                         "(a latent generator for Defuse)")
    return load_autoencoder_kl(uri, folder, (params or {}).get("resolution"))
