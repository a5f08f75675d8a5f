"""What a counterfactual writer produces, whichever writes it (a language model or the offline lexicons).

The DILLEMA recipe in three steps: (1) the words of a caption that can change without changing its
label, (2) alternatives for each, (3) the caption rewritten with up to 3 of those substitutions, twice.
Every step's answer has a JSON schema; the class name and its synonyms are never modifiable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

# The answers of the three steps, as JSON schemas (an LLM is asked for them and checked against them).
WORDS_SCHEMA = {"type": "object", "required": ["words"], "additionalProperties": False,
                "properties": {"words": {"type": "array", "items": {"type": "string", "minLength": 1}}}}
ALTERNATIVES_SCHEMA = {"type": "object", "required": ["alternatives"], "additionalProperties": False,
                       "properties": {"alternatives": {"type": "object", "additionalProperties": {
                           "type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}}}}
CAPTIONS_SCHEMA = {"type": "object", "required": ["captions"], "additionalProperties": False,
                   "properties": {"captions": {"type": "array", "minItems": 2, "maxItems": 2,
                                               "items": {"type": "string", "minLength": 1}}}}
MAX_EDITS = 3  # substitutions per counterfactual, as in the reference code


@dataclass
class Rewrite:
    """The counterfactuals of one caption: the modifiable ``words``, their ``alternatives``, the rewritten
    ``captions`` and, for each, its ``edits`` ([word, alternative] pairs; word "" for an added phrase).
    ``valid`` is False when a step produced no usable answer; ``error`` and ``answer`` then hold why and
    the last text received.
    ``calls``: language-model calls made (0 for the offline writer)."""

    caption: str
    words: list[str] = field(default_factory=list)
    alternatives: dict[str, list[str]] = field(default_factory=dict)
    edits: list[list[list[str]]] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    valid: bool = True
    error: str = ""
    answer: str = ""
    calls: int = 0


def protected(class_name: str, synonyms: list[str] = ()) -> set[str]:
    """Lower-cased words that must never change: the class name, its synonyms and each of their words.

    >>> sorted(protected("stop sign", ["halt"]))
    ['halt', 'sign', 'stop', 'stop sign']
    """
    names = {class_name.lower(), *(s.lower() for s in synonyms)}
    return names | {w for n in names for w in n.split()}


def in_caption(word: str, caption: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", caption, re.I) is not None


def modifiable(words: list[str], caption: str, keep: set[str]) -> list[str]:
    """The words that may change: in the caption, not protected, each once, in order."""
    out = []
    for w in words:
        w = w.strip()
        if w and w.lower() not in keep and in_caption(w, caption) and w.lower() not in map(str.lower, out):
            out.append(w)
    return out


def choose_edits(alternatives: dict[str, list[str]], rng: np.random.Generator,
                 most: int = MAX_EDITS) -> list[list[str]]:
    """Up to ``most`` substitutions, each a [word, alternative] pair for a different word (seeded)."""
    words = [w for w, alts in alternatives.items() if alts]
    if not words:
        return []
    chosen = rng.permutation(len(words))[: int(rng.integers(1, min(most, len(words)) + 1))]
    return [[words[i], alternatives[words[i]][int(rng.integers(len(alternatives[words[i]])))]] for i in sorted(chosen)]


def substitute(caption: str, edits: list[list[str]]) -> str:
    """The caption with each edit's word replaced (whole words, the first occurrence).

    >>> substitute("a red car on a sunny road", [["red", "blue"], ["sunny", "snowy"]])
    'a blue car on a snowy road'
    """
    for word, alternative in edits:
        caption = re.sub(rf"\b{re.escape(word)}\b", alternative, caption, count=1, flags=re.I)
    return caption
