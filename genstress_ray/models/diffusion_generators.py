"""One protocol for the diffusion models KLDB guidance samples from, and its two families.

A ``DiffusionGenerator`` is conditioned once on the boundary's classes (``condition``), then gives
the guided sampler what it needs: the shape of its latents, the noise schedule it was trained on,
a classifier-free-guided noise prediction, and ``decode`` from latents to images of the data's shape
in [0, 1] (differentiably: KLDB's gradient flows through it).

- ``ClassConditionalDiffusion``: a diffusers ``UNet2DModel`` with class embeddings and one extra
  "null" class (``models.diffusion.small_ddpm``), sampling in pixel space. "Prompting" with the
  classes of C alternates their class embeddings step by step.
- ``StableDiffusion``: a Stable Diffusion v1.x folder in diffusers format (``unet``, ``vae``,
  ``text_encoder``, ``tokenizer``, ``scheduler``), from a local path or any fsspec URI, prompted with
  text built from the class names. Latents are the VAE's; decoded images are resized to the data's.
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torch import nn

from genstress_ray.models.diffusion import NOISE_SCHEDULE
from genstress_ray.models.protocols import LOAD_ERRORS, ModelError, load_failure
from genstress_ray.models.folders import local_folder

# The sub-folders of a diffusers Stable Diffusion folder this project loads (the safety checker and
# feature extractor are not needed to sample).
SD_COMPONENTS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                 "tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}


class DiffusionGenerator(nn.Module):
    """The protocol: ``latent_shape``, ``scheduler_config``, ``condition``, ``noise_pred``, ``decode``.

    ``latent_dim`` is the length of a flat latent as stored in the ``samples`` table.
    """

    latent_shape: tuple[int, ...]
    scheduler_config: dict

    @property
    def latent_dim(self) -> int:
        return math.prod(self.latent_shape)

    def condition(self, classes: list[int], class_names: list[str], prompt: str = "{classes}",
                  negative_prompt: str = "") -> None:
        """Condition every later ``noise_pred`` on the classes of the boundary (indices and names)."""
        raise NotImplementedError

    def noise_pred(self, x: torch.Tensor, t: torch.Tensor, step: int, beta: torch.Tensor) -> torch.Tensor:
        """Noise predicted for model input ``x`` at timestep ``t`` with guidance scale ``beta`` per row:
        unconditional + beta * (conditional - unconditional)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] for latents, flat (N, latent_dim) or shaped."""
        raise NotImplementedError

    @staticmethod
    def _to_unit(images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> [0, 1], clamped on the way forward only (straight-through): a plain clamp has no
        gradient wherever the predicted x0 overshoots, which early in sampling is nearly everywhere."""
        unit = images * 0.5 + 0.5
        return unit + (unit.clamp(0, 1) - unit).detach()

    @staticmethod
    def _cfg(both: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        conditional, unconditional = both.chunk(2)
        beta = beta.to(both).view(-1, *([1] * (both.ndim - 1)))
        return unconditional + beta * (conditional - unconditional)


class ClassConditionalDiffusion(DiffusionGenerator):
    """A class-conditional pixel ``UNet2DModel`` whose last class embedding is the null class.

    Example:
        >>> from genstress_ray.models import get_model
        >>> net = get_model("small_ddpm", in_shape=(1, 8, 8), num_classes=10, channels=(8, 16), norm_num_groups=4)
        >>> g = ClassConditionalDiffusion(net, (1, 8, 8), num_classes=10)
        >>> g.condition([4, 9], [str(i) for i in range(10)])
        >>> g.noise_pred(torch.zeros(3, 1, 8, 8), torch.tensor(999), 0, torch.full((3,), 3.0)).shape
        torch.Size([3, 1, 8, 8])
    """

    def __init__(self, net: nn.Module, image_shape, num_classes: int | None = None):
        super().__init__()
        config = getattr(net, "config", None)
        embeds = getattr(config, "num_class_embeds", None)
        if embeds is None:
            raise ModelError(f"diffusion model {type(net).__name__} is not a class-conditional UNet2DModel "
                             "(no config.num_class_embeds); Stable Diffusion folders load with format: diffusers")
        if num_classes is not None and embeds != num_classes + 1:
            raise ModelError(f"diffusion model has {embeds} class embeddings; the dataset's {num_classes} classes "
                             f"need {num_classes + 1} (the last one is the null class of classifier-free guidance)")
        shape = (config.in_channels, config.sample_size, config.sample_size)
        if shape != tuple(int(s) for s in image_shape):
            raise ModelError(f"diffusion model samples images of shape {shape}, but the classifier and dataset "
                             f"use {tuple(image_shape)}")
        self.net, self.null_class = net, embeds - 1
        self.latent_shape, self.scheduler_config = shape, dict(NOISE_SCHEDULE)
        self.register_buffer("classes", torch.zeros(0, dtype=torch.long), persistent=False)

    def condition(self, classes, class_names, prompt="{classes}", negative_prompt=""):
        self.classes = torch.as_tensor(list(classes), dtype=torch.long, device=self.classes.device)

    def noise_pred(self, x, t, step, beta):
        if not len(self.classes):
            raise ModelError("diffusion model: call condition() with the boundary's classes before sampling")
        n = len(x)
        labels = torch.cat([self.classes[step % len(self.classes)].repeat(n),
                            torch.full((n,), self.null_class, dtype=torch.long, device=x.device)])
        return self._cfg(self.net(torch.cat([x, x]), t, class_labels=labels).sample, beta)

    def decode(self, latents):
        return self._to_unit(latents.reshape(len(latents), *self.latent_shape))


class StableDiffusionComponents(nn.Module):
    """The loaded parts of a Stable Diffusion folder (what ``load_module(uri, "diffusers")`` returns)."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer, scheduler_config: dict):
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler_config = tokenizer, dict(scheduler_config)


class StableDiffusion(DiffusionGenerator):
    """Stable Diffusion v1.x (epsilon prediction) prompted with the boundary's class names."""

    def __init__(self, parts: StableDiffusionComponents, image_shape, num_classes: int | None = None):
        super().__init__()
        prediction = parts.scheduler_config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ModelError(f"Stable Diffusion scheduler predicts {prediction!r}; KLDB guidance needs an "
                             "epsilon-prediction model (v1.x)")
        self.parts, self.image_shape = parts, tuple(int(s) for s in image_shape)
        cfg = parts.unet.config
        self.latent_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.scheduler_config = parts.scheduler_config
        self.scaling = float(getattr(parts.vae.config, "scaling_factor", 0.18215))
        self.register_buffer("prompt_embeds", torch.zeros(0), persistent=False)
        self.register_buffer("negative_embeds", torch.zeros(0), persistent=False)

    @torch.no_grad()
    def _embed(self, text: str) -> torch.Tensor:
        tok = self.parts.tokenizer
        ids = tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.prompt_embeds.device)
        return self.parts.text_encoder(ids)[0].to(next(self.parts.unet.parameters()).dtype)

    def condition(self, classes, class_names, prompt="a photo of a {classes}", negative_prompt=""):
        text = prompt.format(classes=" and ".join(class_names[c] for c in classes))
        self.prompt_embeds, self.negative_embeds = self._embed(text), self._embed(negative_prompt)

    def noise_pred(self, x, t, step, beta):
        if not self.prompt_embeds.numel():
            raise ModelError("Stable Diffusion: call condition() with the boundary's classes before sampling")
        n = len(x)
        hidden = torch.cat([self.prompt_embeds.expand(n, -1, -1), self.negative_embeds.expand(n, -1, -1)])
        return self._cfg(self.parts.unet(torch.cat([x, x]), t, encoder_hidden_states=hidden).sample, beta)

    def decode(self, latents):
        vae = self.parts.vae
        latents = latents.reshape(len(latents), *self.latent_shape).to(next(vae.parameters()).dtype)
        images = self._to_unit(vae.decode(latents / self.scaling).sample.float())
        if images.shape[1] != self.image_shape[0]:
            images = images.mean(1, keepdim=True) if self.image_shape[0] == 1 else images
        if tuple(images.shape[2:]) != self.image_shape[1:]:
            images = F.interpolate(images, size=self.image_shape[1:], mode="bilinear", antialias=True,
                                   align_corners=False)
        return images


def load_stable_diffusion(uri: str, dtype: torch.dtype = torch.float32) -> StableDiffusionComponents:
    """Load a Stable Diffusion v1.x folder in diffusers format from a local path or fsspec URI.

    Raises:
        ModelError: naming every component the folder lacks.
    """
    folder = local_folder(uri, "diffusers")
    missing = [f"{name}/{marker}" for name, marker in SD_COMPONENTS.items() if not (folder / name / marker).exists()]
    if missing:
        raise ModelError(f"Stable Diffusion folder {uri!r} lacks {', '.join(missing)} (diffusers layout: "
                         f"{', '.join(SD_COMPONENTS)})")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        kwargs = {"torch_dtype": dtype, "local_files_only": True}
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", **kwargs)
        vae = AutoencoderKL.from_pretrained(folder / "vae", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    except LOAD_ERRORS as exc:
        raise ModelError(f"Stable Diffusion folder {uri!r} failed to load: {load_failure(exc)}") from None
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return StableDiffusionComponents(unet, vae, text_encoder, tokenizer, scheduler_config).eval()


def diffusion_generator(net: nn.Module, image_shape, num_classes: int | None = None) -> DiffusionGenerator:
    """The protocol wrapper for a loaded diffusion model: Stable Diffusion parts or a class-conditional UNet."""
    family = StableDiffusion if isinstance(net, StableDiffusionComponents) else ClassConditionalDiffusion
    generator = family(net, image_shape, num_classes)
    generator.requires_grad_(False)  # guidance differentiates w.r.t. latents only
    return generator
