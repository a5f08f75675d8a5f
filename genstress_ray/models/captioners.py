"""Image captioners: a local ``transformers`` image-to-text folder (BLIP, BLIP-2 and the like).

As the reference code does, each image gets ``samples`` nucleus-sampled captions, joined into one
(two by default: one sample often misses part of the scene). Seeded, so a rerun writes the same
captions. Nothing in the folder runs as code (``trust_remote_code`` stays off).

Example:
    >>> captioner = TransformersCaptioner("models/blip-base")  # doctest: +SKIP
    >>> captioner.caption(images)  # uint8 (N, C, H, W)  # doctest: +SKIP
    ['a red stop sign on a pole. a stop sign by a road', ...]
"""

from __future__ import annotations

import numpy as np
import torch

from genstress_ray.models.folders import load_transformers_folder

# What a captioner folder must hold (what ``save_pretrained`` of a model and its processor write).
NEEDED = ("config.json", "preprocessor_config.json|processor_config.json", "tokenizer_config.json")


class TransformersCaptioner:
    """Captions from a transformers image-to-text folder (a local path or an fsspec URI)."""

    def __init__(self, uri: str, samples: int = 2, top_p: float = 0.9, max_new_tokens: int = 30,
                 min_new_tokens: int = 0, seed: int = 0, device: str = "cpu"):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor, self.model = load_transformers_folder(uri, "captioner", "image-to-text model", NEEDED,
                                                              AutoProcessor, AutoModelForImageTextToText, device)
        self.samples, self.top_p, self.seed, self.device = samples, top_p, seed, device
        self.lengths = {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens}

    @torch.no_grad()
    def caption(self, images: np.ndarray, seeds: list[int] | None = None) -> list[str]:
        """One caption per uint8 (N, C, H, W) image: its sampled captions joined with ". ". With ``seeds``
        (one per image), each image is captioned from its own seed, so its caption does not depend on the
        batch it came in; without, the batch is sampled together from the captioner's seed."""
        if not len(images):
            return []
        if seeds is not None:
            return [self._caption(images[i:i + 1], s)[0] for i, s in enumerate(seeds)]
        return self._caption(images, self.seed)

    def _caption(self, images: np.ndarray, seed: int) -> list[str]:
        pictures = [np.repeat(im, 3, 0).transpose(1, 2, 0) if im.shape[0] == 1 else im.transpose(1, 2, 0)
                    for im in images]
        inputs = self.processor(images=pictures, return_tensors="pt").to(self.device)
        torch.manual_seed(seed)
        out = self.model.generate(**inputs, do_sample=True, top_p=self.top_p, num_return_sequences=self.samples,
                                  **self.lengths)
        texts = [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]
        return [". ".join(dict.fromkeys(t for t in texts[i * self.samples:(i + 1) * self.samples] if t))
                for i in range(len(images))]
