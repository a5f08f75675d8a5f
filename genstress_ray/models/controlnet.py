"""Regeneration that keeps the layout: Stable Diffusion with a ControlNet (diffusers'
``StableDiffusionControlNetPipeline``), both from local folders or fsspec URIs, nothing downloaded.

The reference code's settings are the defaults: UniPC, 5 steps, a fixed negative prompt, several images
per counterfactual. Any scheduler class diffusers ships can be named instead; fp16 on a GPU.

Example:
    >>> regen = ControlNetRegenerator("models/sd15", "models/controlnet-canny")  # doctest: +SKIP
    >>> images = regen.generate(edges, ["a red stop sign at night"], seeds=[0])  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch

from genstress_ray.models.diffusion_generators import StableDiffusionComponents, load_stable_diffusion
from genstress_ray.models.folders import local_folder
from genstress_ray.models.protocols import LOAD_ERRORS, ModelError, load_failure

# The reference code's negative prompt for regeneration.
NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality, blurry, deformed, watermark, text"


def scheduler_class(name: str):
    """A diffusers scheduler class by its class name (only classes diffusers ships are accepted)."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and isinstance(getattr(diffusers, n), type))
        raise ModelError(f"scheduler {name!r} is not a diffusers scheduler; e.g. {', '.join(known[:8])}, ...")
    return cls


class ControlNetRegenerator:
    """Images from prompts, each conditioned on a control image (edges of the source image).

    ``sd``: a Stable Diffusion folder's URI, or its parts already loaded (a run's generator: the
    pipeline shares them, in their dtype). ``controlnet``: a ControlNet folder's URI, or a loaded
    ``ControlNetModel``."""

    def __init__(self, sd: str | StableDiffusionComponents, controlnet: str | torch.nn.Module,
                 scheduler: str = "UniPCMultistepScheduler", steps: int = 5, guidance_scale: float = 7.5,
                 negative_prompt: str = NEGATIVE_PROMPT, device: str = "cpu", fp16: bool | None = None):
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

        if isinstance(sd, StableDiffusionComponents):
            parts, dtype = sd, next(sd.unet.parameters()).dtype
        else:
            dtype = torch.float16 if (fp16 if fp16 is not None else device.startswith("cuda")) else torch.float32
            parts = load_stable_diffusion(sd, dtype)
        if isinstance(controlnet, str):
            try:
                controlnet = ControlNetModel.from_pretrained(local_folder(controlnet, "controlnet"), torch_dtype=dtype,
                                                             local_files_only=True)
            except LOAD_ERRORS as exc:
                raise ModelError(f"ControlNet folder {controlnet!r} failed to load: {load_failure(exc)}") from None
        sched = scheduler_class(scheduler).from_config(parts.scheduler_config)
        self.pipe = StableDiffusionControlNetPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
            controlnet=controlnet, scheduler=sched, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.channels = controlnet.config.conditioning_channels
        self.size = parts.unet.config.sample_size * self.pipe.vae_scale_factor  # the side it was trained at
        self.scaling = float(getattr(parts.vae.config, "scaling_factor", 0.18215))
        self.steps, self.guidance_scale, self.negative_prompt = steps, guidance_scale, negative_prompt
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def generate(self, controls: np.ndarray, prompts: list[str], seeds: list[int], per_prompt: int = 1,
                 latents: bool = False):
        """``per_prompt`` images for each (control image, prompt, seed): uint8 (N * per_prompt, 3, H, W),
        the images of one prompt together. Control images are uint8 (N, C, H, W) at the output size.
        With ``latents``, also the final denoised latents (float32, scaled as the UNet sees them: what
        ``StableDiffusion.decode`` turns back into images)."""
        if not len(prompts):
            empty = np.zeros((0, 3, *controls.shape[2:]), np.uint8)
            return (empty, torch.zeros(0, 0)) if latents else empty
        if controls.shape[1] != self.channels:
            raise ModelError(f"the ControlNet takes {self.channels}-channel control images, and these have "
                             f"{controls.shape[1]}")
        if not len(controls) == len(prompts) == len(seeds):
            raise ValueError(f"{len(controls)} control images, {len(prompts)} prompts and {len(seeds)} seeds: "
                             "one of each per counterfactual")
        image = torch.from_numpy(np.ascontiguousarray(controls)).float().div(255).to(self.device, self.dtype)
        generators = [torch.Generator(self.device).manual_seed(int(s) * 1000 + k) for s in seeds
                      for k in range(per_prompt)]
        out = self.pipe(prompt=list(prompts), image=image, num_inference_steps=self.steps,
                        guidance_scale=self.guidance_scale, negative_prompt=[self.negative_prompt] * len(prompts),
                        num_images_per_prompt=per_prompt, generator=generators, output_type="latent",
                        height=controls.shape[2], width=controls.shape[3]).images
        decoded = self.pipe.vae.decode(out / self.scaling).sample.float()
        images = (decoded / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
        return (images, out.float().cpu()) if latents else images
