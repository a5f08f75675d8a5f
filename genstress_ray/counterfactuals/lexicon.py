"""The offline counterfactual writer: attribute lexicons instead of a language model, so the method
runs anywhere (the demo, CI). Same output as the language-model path (``text.Rewrite``).

A caption word found in a lexicon (colour, weather, time of day, background, material, texture,
viewpoint, season) may change to another word of the same lexicon. A caption with none of them gets
attribute phrases instead ("at night", "in the snow"), so every caption has counterfactuals.
"""

from __future__ import annotations

import numpy as np

from genstress_ray.counterfactuals.text import Rewrite, choose_edits, modifiable, protected, substitute

LEXICONS: dict[str, list[str]] = {
    "colour": ["red", "blue", "green", "yellow", "white", "black", "grey", "orange", "purple", "brown", "pink"],
    "weather": ["sunny", "rainy", "snowy", "foggy", "cloudy", "stormy", "misty"],
    "time of day": ["morning", "noon", "afternoon", "evening", "night", "dusk", "dawn"],
    "background": ["street", "road", "forest", "field", "beach", "city", "desert", "park", "room", "wall", "sky"],
    "material": ["wooden", "metal", "plastic", "glass", "stone", "paper", "concrete"],
    "texture": ["smooth", "rough", "striped", "dotted", "shiny", "matte", "dirty", "rusty"],
    "viewpoint": ["front", "side", "back", "top", "close-up", "distant", "tilted"],
    "season": ["spring", "summer", "autumn", "winter"],
}
# For captions with no lexicon word: phrases appended instead, one per lexicon where a phrase reads well.
PHRASES: dict[str, list[str]] = {
    "weather": ["in the rain", "in the snow", "in fog", "under a cloudy sky"],
    "time of day": ["at night", "at dusk", "in the early morning"],
    "background": ["in a forest", "on a city street", "in a field", "against a brick wall"],
    "season": ["in winter", "in autumn", "in summer"],
}


class LexiconWriter:
    """Counterfactual captions from the lexicons; deterministic for a seed.

    >>> w = LexiconWriter().write("a red stop sign on a sunny street", "stop sign", seed=0)
    >>> w.words, w.valid, len(w.captions)
    (['red', 'sunny', 'street'], True, 2)
    """

    def __init__(self, lexicons: dict[str, list[str]] | None = None, captions: int = 2):
        self.lexicons, self.n = lexicons or LEXICONS, captions
        self.category = {w: name for name, words in self.lexicons.items() for w in words}

    def write(self, caption: str, class_name: str, synonyms: list[str] = (), task: str = "", seed: int = 0) -> Rewrite:
        rng = np.random.default_rng(seed)
        keep = protected(class_name, synonyms)
        words = modifiable([w for w in caption.replace(",", " ").split() if w.lower() in self.category], caption, keep)
        alternatives = {w: [a for a in self.lexicons[self.category[w.lower()]] if a != w.lower()] for w in words}
        rewrite = Rewrite(caption, words, alternatives)
        for _ in range(self.n):
            if alternatives:
                edits = choose_edits(alternatives, rng)
                text = substitute(caption, edits)
            else:  # nothing to swap: add an attribute instead
                name = list(PHRASES)[int(rng.integers(len(PHRASES)))]
                phrase = PHRASES[name][int(rng.integers(len(PHRASES[name])))]
                edits, text = [["", phrase]], f"{caption.rstrip('. ')} {phrase}"
            rewrite.edits.append(edits)
            rewrite.captions.append(text)
        return rewrite
