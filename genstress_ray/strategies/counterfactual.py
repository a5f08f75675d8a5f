"""LLM counterfactuals with ControlNet (the DILLEMA line), on one batch of source images in plain torch
(no Ray): caption each image, write label-preserving counterfactual captions, regenerate each
``per_caption`` times from the source's control image (so the layout stays), and classify the results.

A candidate is a fault when the classifier's prediction differs from the source's label; whether it
differs from the classifier's own prediction on the source image is recorded beside it
(``flipped``). Layout kept is measured per candidate (``edge_agreement`` of their Canny edges, SSIM
to the source). For a segmentation model under test (given the sources' masks), a fault is an mIoU
drop beyond a threshold (``segmentation_scores``). A candidate's latent is its final denoised Stable Diffusion latent, which the regions
stage clusters and the generator decodes back into images (as for KLDB on Stable Diffusion).

Everything random is drawn from each source's own stream (``row_rng`` of its id): a source gets the
same captions, texts and images however the search images are batched or spread over actors.
"""

from __future__ import annotations

import base64
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from genstress_ray.counterfactuals import CAPTIONERS, CONTROLS, LLM_BACKENDS, WRITERS
from genstress_ray.counterfactuals.control import MASK_CONTROLS, canny
from genstress_ray.counterfactuals.text import Rewrite
from genstress_ray.data import IGNORE, png_bytes
from genstress_ray.metrics import edge_agreement, score_logits, ssim
from genstress_ray.models.controlnet import NEGATIVE_PROMPT, ControlNetRegenerator
from genstress_ray.models.segmentation import Segmenter, miou, miou_drop
from genstress_ray.registry import resolve
from genstress_ray.strategies.base import Strategy, StrategyParams
from genstress_ray.strategies.seeds import row_rng

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


def source_seed(seed: int, source_id: str) -> int:
    """The seed of everything random about one source image (its caption, its texts, its images)."""
    return int(row_rng(seed, source_id).integers(2**31))


class LLMProcessor(BaseModel):
    """``strategy.llm_processor``: write every search image's counterfactual captions first, through
    Ray Data's LLM processor (``stages.rewrites``), then regenerate from the stored captions.
    ``batch_size``: dialogues per request batch; ``concurrency`` and ``qps``: an endpoint's request
    workers and rate (a vLLM writer sets its engines' ``concurrency`` itself)."""

    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(16, gt=0)
    concurrency: int = Field(1, gt=0)
    qps: int | None = Field(None, gt=0)


class CounterfactualParams(StrategyParams):
    """``strategy:`` of an LLM-counterfactual run. The run's ``generator`` is a Stable Diffusion folder;
    ``controlnet`` the ControlNet folder that conditions it on ``control`` images of each source.

    ``captioner``: ``{"name": "transformers", "uri": ...}`` or ``{"name": "chat", "base_url": ...,
    "model": ...}`` (``genstress_ray.counterfactuals.CAPTIONERS``); None: ``caption_template`` with the
    source's class name. ``writer``: ``{"name": "lexicon"}`` (offline, the default), ``{"name": "chat",
    "base_url": ..., "model": ..., "api_key_env": ...}`` or ``{"name": "transformers", "uri": ...}`` (a
    local causal LM folder) (``WRITERS``). With ``llm_processor`` the writer's dialogue runs through
    Ray Data's LLM processor instead: ``chat``, or ``{"name": "vllm", "model_source": ...,
    "engine_kwargs": ...}`` (engines Ray Data starts on the cluster's GPUs) (``LLM_BACKENDS``)."""

    name: Literal["counterfactual"] = "counterfactual"
    controlnet: str
    control: str = "canny"
    captioner: dict[str, Any] | None = None
    caption_template: str = "a photo of a {class_name}"
    writer: dict[str, Any] = Field(default_factory=lambda: {"name": "lexicon"})
    llm_processor: LLMProcessor | None = None
    synonyms: dict[str, list[str]] = Field(default_factory=dict)
    task: str = "image classification"
    per_caption: int = Field(5, ge=1)  # images per counterfactual caption, as in the reference code
    steps: int = Field(5, ge=1)
    scheduler: str = "UniPCMultistepScheduler"
    guidance_scale: float = Field(7.5, ge=0)
    negative_prompt: str = NEGATIVE_PROMPT
    size: int | None = Field(None, ge=8)  # the side images are regenerated at; None: the generator's own
    keep: Literal["faults", "all"] = "faults"
    # A segmentation model under test (classifier.task: segmentation): a fault is an mIoU drop from
    # the source image above this.
    miou_drop: float = Field(0.1, gt=0, le=1)

    @property
    def needs_masks(self) -> bool:
        """Whether its control images are made from the sources' masks."""
        return self.control in MASK_CONTROLS

    @field_validator("control")
    @classmethod
    def _known_control(cls, v):
        CONTROLS.get(v)
        return v

    @field_validator("writer", "captioner")
    @classmethod
    def _named_plugin(cls, v, info):
        if v is None:
            return v
        registry = WRITERS if info.field_name == "writer" else CAPTIONERS
        if "name" not in v:
            raise ValueError(f"needs a 'name': one of {', '.join(registry.names())}")
        if not (info.field_name == "writer" and v["name"] in LLM_BACKENDS):
            registry.get(v["name"])
        return v

    @model_validator(mode="after")
    def _writer_fits_the_processor(self):
        name = self.writer["name"]
        if self.llm_processor is not None and name not in LLM_BACKENDS:
            raise ValueError(f"llm_processor: runs a language model's dialogue through Ray Data's LLM processor, and "
                             f"writer {name!r} is none (allowed: {', '.join(LLM_BACKENDS.names())})")
        if self.llm_processor is None and name not in WRITERS:
            raise ValueError(f"writer: {name!r} runs only through Ray Data's LLM processor: set llm_processor")
        return self

    @field_validator("caption_template")
    @classmethod
    def _template(cls, v):
        try:
            v.format(class_name="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{v!r}: only {{class_name}} may be filled in ({exc})") from None
        return v


# The plugins that load a local model folder: the driver checks their options and folder without
# loading them (a BLIP-2 or a 13B chat model is for the actors to load, on their GPUs).
LOCAL_MODELS = {("captioner", "transformers"): "genstress_ray.models.captioners:TransformersCaptioner",
                ("writer", "transformers"): "genstress_ray.models.language:TransformersChat"}


def _plugin(registry, spec: dict, field_name: str, device: str, load: bool = True):
    """The captioner or writer ``spec`` names, built; with ``load`` False, a local model's options and
    folder are only checked (and None returned)."""
    options = {k: v for k, v in spec.items() if k != "name"}
    local = LOCAL_MODELS.get((field_name, spec["name"]))
    try:
        if local is None:
            return registry.get(spec["name"])(**options)
        options = {"device": device, **options}  # a local model: on the stage's device
        if load:
            return registry.get(spec["name"])(**options)
        options.pop("attempts", None)
        inspect.signature(resolve(local)).bind(**options)
    except TypeError as exc:
        raise ValueError(f"strategy.{field_name}: {exc}") from None
    uri = str(options.get("uri", ""))
    if "://" not in uri and not Path(uri).is_dir():
        raise ValueError(f"strategy.{field_name}.uri: {uri!r} is not a folder (a transformers model folder)")
    return None


def caption_sources(captioner, template: str, class_names: list[str], images: np.ndarray, labels: np.ndarray,
                    seeds: list[int]) -> list[str]:
    """One caption per source image: the captioner's (``caption(images, seeds)``), or ``template``
    with the class name where there is none or it gave an empty one."""
    made = captioner.caption(images, seeds) if captioner is not None else [""] * len(labels)
    return [c or template.format(class_name=class_names[int(y)]) for c, y in zip(made, labels)]


@dataclass
class Candidates:
    """A batch's counterfactual images, one row each, in candidate order: ``source`` (the index of its
    source image in the batch), ``draw`` (caption index x ``per_caption`` + image index), ``seed`` (its
    generator seed), ``text``/``edits`` (its counterfactual caption and the word swaps), ``latents``,
    ``images`` (floats at the data's shape), ``scores`` (``score_logits``), ``flipped`` (prediction
    differs from the one on the source image), ``source_pred``, ``edge_agreement``, ``ssim``;
    ``skipped``: the batch's sources the classifier already gets wrong, which make no candidates;
    ``texts``: the counterfactual captions the images were made from (a skipped source's are unused)."""

    source: np.ndarray
    draw: np.ndarray
    seed: list[int]
    text: list[str]
    edits: list[list[list[str]]]
    latents: torch.Tensor
    images: torch.Tensor
    scores: dict[str, torch.Tensor]
    flipped: torch.Tensor
    source_pred: torch.Tensor
    edge_agreement: torch.Tensor
    ssim: torch.Tensor
    segmentation: list[dict] | None = None
    skipped: int = 0
    texts: int = 0

    def __len__(self) -> int:
        return len(self.source)

    def params(self, i: int, rewrites: list[Rewrite], control: str) -> str:
        """Row ``i``'s ``params`` JSON: what it was made from and how well it kept the layout (and, for
        a segmentation model, its mIoU drop and per-class IoU drop)."""
        r = rewrites[int(self.source[i])]
        return json.dumps({"caption": r.caption, "text": self.text[i], "edits": self.edits[i], "control": control,
                           "image_seed": self.seed[i], "flipped": bool(self.flipped[i]),
                           "source_pred": int(self.source_pred[i]),
                           "edge_agreement": round(float(self.edge_agreement[i]), 6),
                           "ssim": round(float(self.ssim[i]), 6),
                           **(self.segmentation[i] if self.segmentation is not None else {})})


def segmentation_scores(segmenter: torch.nn.Module, source_x: torch.Tensor, generated: torch.Tensor,
                        masks: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, threshold: float,
                        ignore: int | None = IGNORE) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[dict]]:
    """Scores of regenerated images under a segmentation model (``models.segmentation.Segmenter``),
    against their source's ``masks`` (S, H, W): a **fault** when the mIoU drop from the source image
    exceeds ``threshold``. ``pred``, ``probs`` and the rest are the model's pixel logits averaged over
    the source's object (the mask's pixels of its label; the whole image where the label is absent),
    so a region reads "sign -> segmented as ground". Returns the ``score_logits`` columns, the same
    pooled prediction on each candidate's source image, and per candidate the mIoU on the source and
    on the image, the drop, the IoU drop per class present (by class name) and the predicted label
    map (``pred_mask``: a base64 grey PNG, for the report's overlays)."""
    names = segmenter.class_names
    with torch.no_grad():
        source_logits, logits = segmenter(source_x), segmenter(generated)
    mask, source_map, pred_map = masks[index], source_logits.argmax(1)[index], logits.argmax(1)
    drop, class_drop = miou_drop(source_map, pred_map, mask, len(names), ignore)
    before = miou(source_map, mask, len(names), ignore)
    on_object = mask == labels[index].view(-1, 1, 1)
    on_object |= ~on_object.flatten(1).any(1).view(-1, 1, 1)
    weights = on_object.unsqueeze(1).float()

    def pooled(x: torch.Tensor) -> torch.Tensor:
        return (x * weights).sum((2, 3)) / weights.sum((2, 3))

    scores = score_logits(pooled(logits), labels[index])
    scores["fault"] = drop > threshold
    extra = [{"miou_source": round(float(b), 6), "miou": round(float(b - d), 6), "miou_drop": round(float(d), 6),
              "iou_drop": {names[k]: round(float(v), 6) for k, v in enumerate(row) if not torch.isnan(v)},
              "pred_mask": base64.b64encode(png_bytes(m[None].to(torch.uint8).cpu().numpy())).decode()}
             for b, d, row, m in zip(before, drop, class_drop, pred_map)]
    return scores, pooled(source_logits[index]).argmax(1), extra


@dataclass
class CounterfactualSearch:
    """What one search batch needs: a captioner (``caption(images, seeds) -> list[str]``, or None for
    ``caption_template``), a writer (``write(caption, class_name, synonyms, task, seed) -> Rewrite``), a
    control (``counterfactuals.control``: images and masks -> uint8 control images), a regenerator (``generate(controls, prompts, seeds,
    per_prompt, latents=True)``) and the classifier under test. ``size``: the side the regenerator works
    at (512 for SD 1.5). ``decode``: latents -> images at the data's shape (the run's generator); None:
    the regenerated images resized. The model under test may be a segmentation model (a
    ``Segmenter``) instead: see ``search``."""

    captioner: object | None
    writer: object
    control: object
    regenerator: object
    classifier: torch.nn.Module
    class_names: list[str]
    size: int
    synonyms: dict[str, list[str]] = field(default_factory=dict)
    task: str = "image classification"
    per_caption: int = 1
    caption_template: str = "a photo of a {class_name}"
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    miou_drop: float = 0.1  # a segmentation model's fault threshold

    def rewrite(self, images: np.ndarray, labels: np.ndarray, seeds: list[int]) -> list[Rewrite]:
        """Each source's counterfactual captions: its caption, rewritten by the writer."""
        captions = caption_sources(self.captioner, self.caption_template, self.class_names, images, labels, seeds)
        return [self.writer.write(caption, self.class_names[int(y)], self.synonyms.get(self.class_names[int(y)], []),
                                  self.task, seed=s) for caption, y, s in zip(captions, labels, seeds)]

    def search(self, images: np.ndarray, labels: np.ndarray, source_ids: list[str], seed: int = 0,
               masks: np.ndarray | None = None, rewrites: list[Rewrite] | None = None
               ) -> tuple[Candidates, list[Rewrite]]:
        """The batch's candidates and every source's ``Rewrite`` (invalid ones included, with why).
        ``masks`` (N, H, W): the sources' segmentation masks, for a control made from them and for a
        segmentation model under test (``Segmenter``), which is scored by ``segmentation_scores`` with
        the ``miou_drop`` threshold. ``rewrites``: the sources' counterfactual captions, written
        already (``stages.rewrites``); None: captioned and written here.

        As in the papers, a classifier's fault is a changed prediction from a correctly classified
        source: sources it already gets wrong make no candidates (they are counted in ``skipped``)."""
        segmenting = isinstance(self.classifier, Segmenter)
        if segmenting and masks is None:
            raise ValueError("a segmentation model under test is scored against the sources' masks: give masks")
        shape = tuple(images.shape[1:])
        seeds = [source_seed(seed, s) for s in source_ids]
        # Scored where the model under test lives (its actor's GPU); the candidates come back on the CPU.
        dev = next(self.classifier.parameters(), torch.zeros(0)).device
        source_x = to_shape(images, shape)
        correct, predicted = np.ones(len(labels), bool), None
        if not segmenting:  # a segmentation model's fault is an mIoU drop from its own source map
            with torch.no_grad():
                predicted = self.classifier(source_x.to(dev)).argmax(-1)
            correct = predicted.cpu().numpy() == np.asarray(labels)
        work = to_shape(images, (3, self.size, self.size)).mul(255).round().to(torch.uint8).numpy()
        controls = self.control(work, masks)
        if rewrites is None:
            kept = np.flatnonzero(correct)
            written = iter(self.rewrite(images[kept], np.asarray(labels)[kept], [seeds[i] for i in kept])
                           if len(kept) else [])
            rewrites = [next(written) if ok else Rewrite(caption="") for ok in correct]
        jobs = [(i, j) for i, r in enumerate(rewrites) if r.valid and correct[i] for j in range(len(r.captions))]
        skipped = int((~correct).sum())
        if not jobs:
            none = torch.zeros(0, dtype=torch.long)
            return Candidates(np.zeros(0, np.int64), np.zeros(0, np.int64), [], [], [], torch.zeros(0, 0),
                              torch.zeros(0, *shape), score_logits(torch.zeros(0, len(self.class_names)), none),
                              none.bool(), none, torch.zeros(0), torch.zeros(0), skipped=skipped), rewrites
        prompts = [rewrites[i].captions[j] for i, j in jobs]
        image_seeds = [seeds[i] + j for i, j in jobs]
        made, latents = self.regenerator.generate(controls[[i for i, _ in jobs]], prompts, image_seeds,
                                                  self.per_caption, latents=True)
        k = self.per_caption
        source = np.repeat(np.asarray([i for i, _ in jobs], np.int64), k)
        draw = np.repeat(np.asarray([j for _, j in jobs], np.int64), k) * k + np.tile(np.arange(k), len(jobs))
        # The run's generator decodes the latents, so that stored images are what a latent decodes to
        # (region samples are decoded the same way).
        generated = self.decode(latents) if self.decode is not None else to_shape(made, shape)
        index, targets = torch.from_numpy(source).to(dev), torch.as_tensor(np.asarray(labels, np.int64), device=dev)
        segmentation = None
        if segmenting:
            scores, source_pred, segmentation = segmentation_scores(
                self.classifier, source_x.to(dev), generated.to(dev),
                torch.as_tensor(np.asarray(masks, np.int64), device=dev), targets, index, self.miou_drop)
        else:
            source_pred = predicted[index]
            with torch.no_grad():
                scores = score_logits(self.classifier(generated.to(dev)), targets[index])
        scores, source_pred = {k: v.cpu() for k, v in scores.items()}, source_pred.cpu()
        jobs_of = np.repeat(np.arange(len(jobs)), k)
        edges = controls if self.control is canny else canny(work)  # the layout kept is judged on edges
        return Candidates(
            source=source, draw=draw, seed=[image_seeds[j] * 1000 + int(d) % k for j, d in zip(jobs_of, draw)],
            text=[prompts[j] for j in jobs_of], edits=[rewrites[jobs[j][0]].edits[jobs[j][1]] for j in jobs_of],
            latents=latents.flatten(1), images=generated, scores=scores,
            flipped=scores["pred"] != source_pred, source_pred=source_pred,
            edge_agreement=edge_agreement(torch.from_numpy(edges[source]), torch.from_numpy(canny(made))),
            ssim=ssim(source_x[index], generated), segmentation=segmentation, skipped=skipped,
            texts=len(jobs)), rewrites


def llm_backend(params: dict):
    """The language model (``ChatEndpoint`` or ``VLLMEngine``) and attempts of a run's
    ``llm_processor`` writer."""
    spec = params["writer"]
    try:
        return LLM_BACKENDS.get(spec["name"])(**{k: v for k, v in spec.items() if k != "name"})
    except TypeError as exc:
        raise ValueError(f"strategy.writer: {exc}") from None


def build_search(params: dict, generator, classifier, class_names: list[str], device: str = "cpu",
                 load_local_models: bool = True) -> CounterfactualSearch:
    """A ``CounterfactualSearch`` from a run's ``strategy`` parameters (a dict), its Stable Diffusion
    generator (``models.StableDiffusion``: the pipeline shares its parts) and classifier. Without
    ``load_local_models``, a local captioner or language model is checked, not loaded (and None)."""
    parts = getattr(generator, "parts", None)
    if parts is None or not hasattr(parts, "vae"):
        raise ValueError("generator: strategy 'counterfactual' needs a Stable Diffusion folder (diffusers layout) "
                         "as generator.uri, which its ControlNet conditions")
    regenerator = ControlNetRegenerator(
        parts, params["controlnet"], scheduler=params["scheduler"], steps=params["steps"],
        guidance_scale=params["guidance_scale"], negative_prompt=params["negative_prompt"], device=device)
    control = CONTROLS.get(params["control"])
    size = params.get("size") or regenerator.size
    channels = control(np.zeros((1, 3, size, size), np.uint8), np.zeros((1, size, size), np.uint8)).shape[1]
    if channels != regenerator.channels:
        raise ValueError(f"strategy.controlnet: the ControlNet takes {regenerator.channels}-channel control images, "
                         f"and control {params['control']!r} makes {channels}-channel ones")
    load = load_local_models
    captioner = _plugin(CAPTIONERS, params["captioner"], "captioner", device, load) if params.get("captioner") else None
    if params.get("llm_processor"):  # written before the search (stages.rewrites): its options checked here
        writer = None
        llm_backend(params)
    else:
        writer = _plugin(WRITERS, params["writer"], "writer", device, load)
    return CounterfactualSearch(captioner, writer, control, regenerator, classifier, class_names, size,
                                params.get("synonyms") or {}, params["task"], params["per_caption"],
                                params["caption_template"], lambda z: generator.decode(z.to(device)).float().cpu(),
                                params.get("miou_drop", 0.1))


def check_generator(params: CounterfactualParams, generator) -> None:
    """Build the search on the driver (ControlNet, writer; local captioner and language-model folders
    checked, not loaded) so that a wrong folder, channel count or option fails before any Ray work."""
    build_search(params.model_dump(), generator, torch.nn.Identity(), [], load_local_models=False)


COUNTERFACTUAL = Strategy("counterfactual", CounterfactualParams, "diffusion_model", None,
                          stage="genstress_ray.stages.counterfactual:CounterfactualStage",
                          assess="genstress_ray.assessment:assess_counterfactual",
                          report="genstress_ray.report.html:counterfactual_table", check_generator=check_generator,
                          prepare="genstress_ray.stages.rewrites:prepare_rewrites", segmentation=True)
