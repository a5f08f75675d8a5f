"""The counterfactual search on a batch, end to end without Ray: tiny random BLIP, the offline
lexicon writer (and a scripted language model), Canny control images, tiny random SD + ControlNet, a
tiny CNN under test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genstress_ray.counterfactuals import CAPTIONERS, CONTROLS, LexiconWriter
from genstress_ray.counterfactuals.text import Rewrite
from genstress_ray.data import get_source
from genstress_ray.models import Classifier, get_model
from genstress_ray.models.controlnet import ControlNetRegenerator
from genstress_ray.strategies.counterfactual import CounterfactualSearch

from models.factories import write_tiny_blip, write_tiny_controlnet, write_tiny_stable_diffusion


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("counterfactual")
    write_tiny_blip(root / "blip")
    write_tiny_stable_diffusion(root / "sd", words=("a", "photo", "of", "digit", "red", "blue", "at", "night"))
    write_tiny_controlnet(root / "sd", root / "canny")
    torch.manual_seed(0)
    classifier = Classifier(get_model("small_cnn", in_shape=(1, 8, 8), num_classes=10), [str(i) for i in range(10)],
                            (1, 8, 8)).eval()
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
    search = CounterfactualSearch(parts["captioner"], OneInvalid(), CONTROLS.get("canny"), parts["regenerator"],
                                  parts["classifier"], digits.class_names, per_caption=2, size=16)
    rows, rewrites = search.search(digits.images, digits.labels, digits.source_ids, seed=5)
    assert [r.valid for r in rewrites] == [True, False, True] and "no valid answer" in rewrites[1].error
    # 2 valid sources x 2 counterfactual captions x 2 images each.
    assert len(rows) == 8 and {r["source_id"] for r in rows} == {digits.source_ids[0], digits.source_ids[2]}
    for r in rows:
        assert r["image"].shape == (3, 16, 16) and r["image"].dtype == np.uint8
        assert r["control"] == "canny" and r["caption"] in {rw.caption for rw in rewrites}
        assert r["text"] != r["caption"] and json.loads(r["edits"])
        assert r["fault"] == (r["pred"] != r["source_label"]) and abs(sum(r["probs"]) - 1) < 1e-5
        assert 0 <= r["edge_agreement"] <= 1 and -1 <= r["ssim"] <= 1
    assert sorted((r["source_id"], r["draw"]) for r in rows) == sorted(
        {(r["source_id"], d) for r in rows for d in range(4)})
    search.writer = OneInvalid()  # the same run again: the same texts and images (seeded)
    again, _ = search.search(digits.images, digits.labels, digits.source_ids, seed=5)
    assert all((a["image"] == b["image"]).all() and a["text"] == b["text"] for a, b in zip(rows, again))
