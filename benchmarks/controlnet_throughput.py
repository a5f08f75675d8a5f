"""Throughput of the counterfactual strategy's regeneration (Stable Diffusion + ControlNet through
``models.controlnet.ControlNetRegenerator``): images/s and peak GPU memory per batch size.

    python benchmarks/controlnet_throughput.py [--preset sd15|tiny] [--batch-sizes 1 2 4 8 16]
                                               [--steps 5] [--repeats 3] [--output FILE]

No weights exist offline, so the components are random, built from configs: ``sd15`` is Stable
Diffusion 1.5's architecture (UNet 320-640-1280-1280 with 768-d cross-attention, the 4-level VAE,
CLIP ViT-L/14's 12-layer text encoder) with a ControlNet made from its UNet, at 512x512 in fp16 on a
GPU. Random weights cost the same compute as trained ones. ``tiny`` is the tests' 16x16 components:
a check that the script runs, on the CPU. The setting is the reference code's: UniPC, 5 steps,
classifier-free guidance 7.5 (so the UNet and ControlNet see twice the batch), Canny control images.
A batch is ``b`` prompts with one image each; each size is warmed up once and timed ``--repeats``
times. Writes benchmarks/results/controlnet_throughput[_tiny].json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' CLIP tokenizer builder: no download

from genstress_ray.counterfactuals.control import CONTROLS  # noqa: E402
from genstress_ray.models.controlnet import ControlNetRegenerator  # noqa: E402
from genstress_ray.models.diffusion_generators import StableDiffusionComponents, load_stable_diffusion  # noqa: E402

SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def sd15(device: str, dtype: torch.dtype) -> tuple[StableDiffusionComponents, torch.nn.Module]:
    """Random Stable Diffusion 1.5 components and a ControlNet from its UNet (built on ``device``)."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.factories import write_tiny_stable_diffusion

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_stable_diffusion(tmp)  # only its tokenizer is kept: ids fit any CLIP vocabulary
        tokenizer = load_stable_diffusion(tmp).tokenizer
    tokenizer.model_max_length = 77
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            hidden_act="quick_gelu"))
        controlnet = ControlNetModel.from_unet(unet)
    parts = StableDiffusionComponents(unet, vae, text, tokenizer, SCHEDULER).to(dtype)
    return parts, controlnet.to(dtype)


def tiny(device: str, dtype: torch.dtype) -> tuple[StableDiffusionComponents, torch.nn.Module]:
    """The tests' tiny random components (16x16 images)."""
    from diffusers import ControlNetModel

    from models.factories import write_tiny_stable_diffusion

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_stable_diffusion(tmp)
        parts = load_stable_diffusion(tmp)
    torch.manual_seed(0)
    return parts.to(device, dtype), ControlNetModel.from_unet(
        parts.unet, conditioning_embedding_out_channels=(4, 8)).to(device, dtype)


PRESETS = {"sd15": sd15, "tiny": tiny}


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure(regenerator: ControlNetRegenerator, batch: int, repeats: int, device: str) -> dict:
    """images/s of ``batch`` prompts, one image each, and the peak memory of the timed calls."""
    side = regenerator.size
    rng = np.random.default_rng(batch)
    sources = rng.integers(0, 256, (batch, 3, side, side), dtype=np.uint8)
    controls = CONTROLS.get("canny")(sources)
    prompts = ["a photo of a chihuahua on a street at night"] * batch
    cuda = device.startswith("cuda")

    def call(seed: int) -> None:
        regenerator.generate(controls, prompts, list(range(seed, seed + batch)))
        if cuda:
            torch.cuda.synchronize()

    call(0)  # warm-up: kernels chosen, memory pools grown
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        call(1000 * (r + 1))
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"batch_size": batch, "seconds_per_batch": [round(t, 4) for t in times],
            "images_per_s": round(batch / best, 3), "images_per_s_median": round(batch / float(np.median(times)), 3),
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="sd15")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    started = time.perf_counter()
    parts, controlnet = PRESETS[args.preset](device, dtype)
    regenerator = ControlNetRegenerator(parts, controlnet, steps=args.steps, device=device)
    built = time.perf_counter() - started
    rows = []
    for b in args.batch_sizes:
        rows.append(measure(regenerator, b, args.repeats, device))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "preset": args.preset, "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor()
        or "cpu", "dtype": str(dtype).removeprefix("torch."), "side": regenerator.size, "steps": args.steps,
        "scheduler": type(regenerator.pipe.scheduler).__name__, "guidance_scale": regenerator.guidance_scale,
        "control": "canny", "parameters": {"unet": parameters(parts.unet), "controlnet": parameters(controlnet),
                                           "vae": parameters(parts.vae), "text_encoder": parameters(parts.text_encoder)},
        "build_s": round(built, 1), "torch": torch.__version__, "rows": rows,
    }
    out = args.output or ROOT / "benchmarks" / "results" / (
        "controlnet_throughput.json" if args.preset == "sd15" else "controlnet_throughput_tiny.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
