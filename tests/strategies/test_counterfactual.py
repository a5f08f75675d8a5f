"""The counterfactual search on a batch, end to end without Ray: tiny random BLIP, the offline
lexicon writer (and a scripted language model), Canny control images, tiny random SD + ControlNet, a
tiny CNN under test."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from genstress_ray.counterfactuals import CAPTIONERS, CONTROLS, LexiconWriter
from genstress_ray.counterfactuals.text import Rewrite
from genstress_ray.data import get_source
from genstress_ray.models import Classifier
from genstress_ray.models.controlnet import ControlNetRegenerator
from genstress_ray.models.training import train_classifier
from genstress_ray.models.segmentation import miou_drop
from genstress_ray.strategies.counterfactual import CounterfactualSearch, to_shape

from models.factories import write_tiny_blip, write_tiny_controlnet, write_tiny_stable_diffusion
from models.test_segmentation import CLASSES, scenes, trained_segmenter


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("counterfactual")
    write_tiny_blip(root / "blip")
    write_tiny_stable_diffusion(root / "sd", words=("a", "photo", "of", "digit", "red", "blue", "at", "night"))
    write_tiny_controlnet(root / "sd", root / "canny")
    # A CNN that reads the digits: a fault is a changed prediction from a source it gets right.
    net, _ = train_classifier(get_source("digits", split="train").load(), None, "small_cnn",
                              {"width": 8, "hidden": 32}, epochs=15, lr=3e-3, seed=0)
    classifier = Classifier(net, [str(i) for i in range(10)], (1, 8, 8)).eval()
    return {"captioner": CAPTIONERS.get("transformers")(str(root / "blip"), min_new_tokens=2, max_new_tokens=4),
            "regenerator": ControlNetRegenerator(str(root / "sd"), str(root / "canny"), steps=2),
            "classifier": classifier}


class OneInvalid:
    """A writer whose second caption gets no valid answer (as a language model that never complies)."""

    def __init__(self):
        self.inner = LexiconWriter()
        self.calls = 0

    def write(self, caption, class_name, synonyms=(), task="", seed=0):
        self.calls += 1
        if self.calls == 2:
            return Rewrite(caption, valid=False, error="step words: no valid answer in 3 attempts", answer="no")
        return self.inner.write(caption, class_name, synonyms, task, seed)


def test_a_batch_of_digits_becomes_scored_counterfactual_candidates(parts):
    digits = get_source("digits", split="test", limit=3).load()
    with torch.no_grad():
        assert (parts["classifier"](torch.from_numpy(digits.images).float() / 255).argmax(1).numpy()
                == digits.labels).all(), "the sources are read right"
    search = CounterfactualSearch(parts["captioner"], OneInvalid(), CONTROLS.get("canny"), parts["regenerator"],
                                  parts["classifier"], digits.class_names, size=16, per_caption=2)
    found, rewrites = search.search(digits.images, digits.labels, digits.source_ids, seed=5)
    assert [r.valid for r in rewrites] == [True, False, True] and "no valid answer" in rewrites[1].error
    # 2 valid sources x 2 counterfactual captions x 2 images each, at the data's shape, with their latents.
    assert len(found) == 8 and set(found.source.tolist()) == {0, 2}
    assert found.images.shape == (8, 1, 8, 8) and found.latents.shape == (8, 4 * 8 * 8)
    assert sorted(zip(found.source.tolist(), found.draw.tolist())) == [(i, d) for i in (0, 2) for d in range(4)]
    for i in range(len(found)):
        row = json.loads(found.params(i, rewrites, "canny"))
        assert row["control"] == "canny" and row["caption"] == rewrites[found.source[i]].caption
        assert row["text"] != row["caption"] and row["edits"] and row["text"] in rewrites[found.source[i]].captions
        assert row["flipped"] == (found.scores["pred"][i] != found.source_pred[i]).item()
        assert 0 <= row["edge_agreement"] <= 1 and -1 <= row["ssim"] <= 1
    labels = torch.as_tensor(digits.labels)[torch.from_numpy(found.source)]
    assert torch.equal(found.scores["fault"], found.scores["pred"] != labels)
    assert torch.allclose(found.scores["probs"].sum(1), torch.ones(8))
    # The stored latent is what the images were decoded from.
    regen = parts["regenerator"]
    decoded = regen.pipe.vae.decode(found.latents[:2].view(2, 4, 8, 8) / regen.scaling).sample
    assert decoded.shape == (2, 3, 16, 16)
    # A source gets the same texts and images whatever batch it is in (its own seed stream).
    search.writer = LexiconWriter()
    alone, _ = search.search(digits.images[2:], digits.labels[2:], digits.source_ids[2:], seed=5)
    assert alone.text == found.text[4:] and torch.allclose(alone.images, found.images[4:], atol=2 / 255)
    assert torch.allclose(alone.latents, found.latents[4:], atol=1e-4)


def test_sources_the_classifier_already_gets_wrong_are_skipped_and_counted(parts):
    """As in the papers, a fault is a changed prediction from a correct source: a source the
    classifier misreads makes no candidate (and costs no writer call)."""
    digits = get_source("digits", split="test", limit=3).load()
    labels = digits.labels.copy()
    labels[1] = (labels[1] + 1) % 10  # the classifier reads source 1 as its digit: wrong for this label
    writer = OneInvalid()
    writer.calls = 5  # never the invalid answer
    search = CounterfactualSearch(None, writer, CONTROLS.get("canny"), parts["regenerator"], parts["classifier"],
                                  digits.class_names, size=16)
    found, rewrites = search.search(digits.images, labels, digits.source_ids, seed=5)
    assert found.skipped == 1 and writer.calls == 5 + 2
    assert set(found.source.tolist()) == {0, 2} and rewrites[1].captions == []
    # Every candidate comes from a correct source, so a fault is exactly a changed prediction.
    assert torch.equal(found.scores["fault"], found.flipped)
    assert (found.source_pred.numpy() == labels[found.source]).all()


def test_without_a_captioner_the_caption_is_the_class_template(parts):
    digits = get_source("digits", split="test", limit=2).load()
    search = CounterfactualSearch(None, LexiconWriter(), CONTROLS.get("canny"), parts["regenerator"],
                                  parts["classifier"], digits.class_names, size=16)
    found, rewrites = search.search(digits.images, digits.labels, digits.source_ids)
    assert [r.caption for r in rewrites] == [f"a photo of a {digits.class_names[y]}" for y in digits.labels]
    assert len(found) == 4 and all(t.startswith(r.caption) for t, r in zip(found.text, [rewrites[0]] * 2 + [rewrites[1]] * 2))


def test_a_segmentation_model_is_scored_by_its_miou_drop_against_the_source_masks(parts):
    scene, masks = scenes(3, seed=2)
    images = scene.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    segmenter, sign = trained_segmenter(), CLASSES.index("sign")
    search = CounterfactualSearch(None, LexiconWriter(), CONTROLS.get("canny"), parts["regenerator"], segmenter,
                                  CLASSES, size=16, miou_drop=0.2)
    found, rewrites = search.search(images, np.full(3, sign), ["s0", "s1", "s2"], seed=1, masks=masks.numpy())
    assert len(found) == 6 and rewrites[0].caption == "a photo of a sign"
    # Recomputed independently from the returned images and the source masks.
    with torch.no_grad():
        source_logits, logits = segmenter(to_shape(images, (3, 16, 16))), segmenter(found.images)
    index = torch.from_numpy(found.source)
    drop, per_class = miou_drop(source_logits.argmax(1)[index], logits.argmax(1), masks[index], len(CLASSES))
    assert torch.equal(found.scores["fault"], drop > 0.2) and found.scores["fault"].any()
    on_sign = (masks[index] == sign).unsqueeze(1).float()
    pooled = (logits * on_sign).sum((2, 3)) / on_sign.sum((2, 3))
    assert torch.equal(found.scores["pred"], pooled.argmax(1))  # what the sign's pixels were segmented as
    for i in range(len(found)):
        p = json.loads(found.params(i, rewrites, "canny"))
        assert p["miou_drop"] == pytest.approx(float(drop[i]), abs=1e-5) and p["miou_source"] > 0.9
        assert p["miou"] == pytest.approx(p["miou_source"] - p["miou_drop"], abs=1e-5)
        assert p["iou_drop"]["sign"] == pytest.approx(float(per_class[i, sign]), abs=1e-5)
        predicted = np.asarray(Image.open(io.BytesIO(base64.b64decode(p["pred_mask"]))))
        assert np.array_equal(predicted, logits[i].argmax(0).numpy())  # the map the report overlays
