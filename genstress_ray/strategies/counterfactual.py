"""The LLM-counterfactual search on one batch of source images, in plain torch (no Ray): caption each
image, write label-preserving counterfactual captions, regenerate each ``per_caption`` times from the
source's control image (so the layout stays), and classify the results.

A candidate is a fault when the classifier's prediction differs from the source's label; whether it
differs from the classifier's own prediction on the source image is recorded beside it
(``flipped``). Layout kept is measured per candidate (``edge_agreement`` of the control images, SSIM
to the source). The Ray stage that runs this over a dataset is still to come (README).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from genstress_ray.counterfactuals.text import Rewrite
from genstress_ray.metrics import edge_agreement, score_logits, ssim

LUMA = (0.299, 0.587, 0.114)


def to_shape(images: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 images (N, C, H, W) as floats in [0, 1] of ``shape`` (C, H, W): resized, RGB <-> grey."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255)
    c, h, w = shape
    if x.shape[1] != c:
        x = x.expand(-1, 3, -1, -1) if c == 3 else (x * x.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x


@dataclass
class CounterfactualSearch:
    """What one search batch needs: a captioner (``caption(images) -> list[str]``), a writer
    (``write(caption, class_name, synonyms, task, seed) -> Rewrite``), a control (uint8 images ->
    uint8 control images), a regenerator (``generate(controls, prompts, seeds, per_prompt)``) and the
    classifier under test. ``size``: the side the regenerator works at (512 for SD 1.5; None: the
    source's)."""

    captioner: object
    writer: object
    control: object
    regenerator: object
    classifier: torch.nn.Module
    class_names: list[str]
    synonyms: dict[str, list[str]] = field(default_factory=dict)
    task: str = "image classification"
    per_caption: int = 1
    size: int | None = None
    control_name: str = "canny"

    def search(self, images: np.ndarray, labels: np.ndarray, source_ids: list[str], seed: int = 0
               ) -> tuple[list[dict], list[Rewrite]]:
        """Candidates (dicts with the ``samples`` columns plus the method's own) and every source's
        ``Rewrite`` (invalid ones included, with why)."""
        shape = tuple(images.shape[1:])
        side = self.size or shape[-1]
        work = (to_shape(images, (3, side, side)).mul(255).round().to(torch.uint8).numpy())
        controls = self.control(work)
        captions = self.captioner.caption(images)
        rewrites, jobs = [], []
        for i, (caption, label) in enumerate(zip(captions, labels)):
            name = self.class_names[int(label)]
            rewrite = self.writer.write(caption or f"a photo of a {name}", name, self.synonyms.get(name, []),
                                        self.task, seed=seed * 100_003 + i)
            rewrites.append(rewrite)
            jobs += [(i, j) for j in range(len(rewrite.captions))] if rewrite.valid else []
        if not jobs:
            return [], rewrites
        prompts = [rewrites[i].captions[j] for i, j in jobs]
        seeds = [seed * 100_003 + i * 101 + j for i, j in jobs]
        made = self.regenerator.generate(controls[[i for i, _ in jobs]], prompts, seeds, self.per_caption)
        source = to_shape(images, shape)
        generated = to_shape(made, shape)
        repeat = torch.tensor([i for i, _ in jobs]).repeat_interleave(self.per_caption)
        with torch.no_grad():
            source_pred = self.classifier(source).argmax(-1)
            scores = score_logits(self.classifier(generated), torch.as_tensor(labels)[repeat])
        layout = edge_agreement(torch.from_numpy(controls[repeat.numpy()]), torch.from_numpy(self.control(made)))
        similarity = ssim(source[repeat], generated)
        rows = []
        for k in range(len(repeat)):
            i, j = jobs[k // self.per_caption]
            rows.append({"source_id": source_ids[i], "source_label": int(labels[i]), "draw": j * self.per_caption
                         + k % self.per_caption, "seed": seeds[k // self.per_caption], "image": made[k],
                         "caption": rewrites[i].caption, "text": prompts[k // self.per_caption],
                         "edits": json.dumps(rewrites[i].edits[j]), "control": self.control_name,
                         "pred": int(scores["pred"][k]), "probs": scores["probs"][k].tolist(),
                         "fault": bool(scores["fault"][k]), "flipped": bool(scores["pred"][k] != source_pred[i]),
                         "entropy": float(scores["entropy"][k]), "margin": float(scores["margin"][k]),
                         "kldb": float(scores["kldb"][k]), "edge_agreement": float(layout[k]),
                         "ssim": float(similarity[k])})
        return rows, rewrites
