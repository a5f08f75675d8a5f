"""Counterfactuals written by a language model behind an OpenAI-compatible chat-completions endpoint
(vLLM, Ray Serve LLM, a hosted API): the three steps of ``text``, each answer asked for as JSON and
checked against its schema.

A malformed or schema-violating answer is sent back with the error and asked again, at most
``attempts`` times per step; after that the caption's ``Rewrite`` is recorded invalid with the error
and the last answer. An endpoint that cannot be reached, or that does not speak the protocol, is an
``EndpointError`` naming it: that is the deployment's fault, not one caption's.

Example:
    >>> writer = ChatWriter(ChatEndpoint("http://127.0.0.1:8000/v1", "llama-2-13b-chat"))  # doctest: +SKIP
    >>> writer.write("a red stop sign on a sunny street", "stop sign", task="traffic signs")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import jsonschema
import numpy as np
import requests

from genstress_ray.counterfactuals.text import (ALTERNATIVES_SCHEMA, CAPTIONS_SCHEMA, WORDS_SCHEMA, Rewrite,
                                                choose_edits, modifiable, protected)


class EndpointError(RuntimeError):
    """The chat endpoint is unreachable, refuses the request, or does not answer in the protocol."""


@dataclass
class ChatEndpoint:
    """An OpenAI-compatible ``/chat/completions`` endpoint. The API key is read from the environment
    variable ``api_key_env`` (never stored in a config or a run); ``json_schema`` sends each step's
    schema as ``response_format`` (structured output, which vLLM and OpenAI honour)."""

    base_url: str
    model: str
    api_key_env: str | None = None
    temperature: float = 0.7
    timeout: float = 120.0
    json_schema: bool = True

    @property
    def url(self) -> str:
        return f"{self.base_url.rstrip('/')}/chat/completions"

    def headers(self) -> dict:
        """The request headers, with the API key from the environment."""
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise EndpointError(f"{self.api_key_env} is not set: it holds the API key of {self.base_url}")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def body(self, messages: list[dict], schema: dict | None = None, name: str = "answer") -> dict:
        """The request body; with a ``schema`` (and ``json_schema``), asking for structured output."""
        body = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if schema is not None and self.json_schema:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
        return body

    def complete(self, messages: list[dict], schema: dict | None = None, name: str = "answer") -> str:
        """The assistant's reply text to ``messages``."""
        url = self.url
        try:
            response = requests.post(url, json=self.body(messages, schema, name), headers=self.headers(),
                                     timeout=self.timeout)
        except requests.RequestException as exc:
            raise EndpointError(f"chat endpoint {url} cannot be reached: {exc}") from None
        if response.status_code != 200:
            raise EndpointError(f"chat endpoint {url} answered HTTP {response.status_code}: {response.text[:300]}")
        try:
            return response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointError(f"chat endpoint {url} did not answer in the chat-completions protocol: "
                                f"{response.text[:300]!r}") from None


def parse_answer(text: str, schema: dict) -> dict:
    """The JSON object in a model's answer (code fences and text around it allowed), checked against
    ``schema``; a ValueError says what is wrong.

    >>> parse_answer('Sure! ```json\\n{"words": ["red"]}\\n```', WORDS_SCHEMA)
    {'words': ['red']}
    """
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    candidate = fenced.group(1) if fenced else text
    start, end = candidate.find("{"), candidate.rfind("}")
    if start < 0:
        raise ValueError("the answer holds no JSON object")
    try:
        value = json.loads(candidate[start:end + 1] if end > start else candidate[start:])
    except json.JSONDecodeError as exc:
        raise ValueError(f"the answer is not valid JSON: {exc}") from None
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        raise ValueError(f"the answer does not match the schema: {exc.message}") from None
    return value


STEPS = {
    "words": ("Task: {task}. The image's class is '{label}'. Its caption: \"{caption}\". Which words of the "
              "caption can change without changing the class? Never the class name or its synonyms. Answer with "
              'JSON only: {{"words": ["word", ...]}}', WORDS_SCHEMA),
    "alternatives": ("Task: {task}. The image's class is '{label}'. Caption: \"{caption}\". For each of these "
                     "words give plausible alternatives that keep the class: {words}. Answer with JSON only: "
                     '{{"alternatives": {{"word": ["alternative", ...]}}}}', ALTERNATIVES_SCHEMA),
    "captions": ("Rewrite the caption \"{caption}\" with these substitutions: {edits}. Keep everything else. "
                 'Write two different sentences. Answer with JSON only: {{"captions": ["...", "..."]}}',
                 CAPTIONS_SCHEMA),
}
SYSTEM = "You write counterfactual image descriptions. Answer with JSON."
DONE = "done"


def start(caption: str, class_name: str, synonyms: list[str] = (), task: str = "image classification",
          seed: int = 0) -> dict:
    """A caption's dialogue with the language model, as JSON-able state (it travels between Ray Data
    passes): the step it is at, the messages of that step, and what earlier steps found."""
    state = {"caption": caption, "class_name": class_name, "synonyms": list(synonyms), "task": task, "seed": seed,
             "calls": 0, "attempt": 0, "words": [], "alternatives": {}, "edits": [], "captions": [], "valid": True,
             "error": "", "answer": ""}
    return _ask(state, "words")


def _ask(state: dict, step: str, **fields) -> dict:
    prompt = STEPS[step][0].format(task=state["task"], label=state["class_name"], caption=state["caption"], **fields)
    return {**state, "step": step, "attempt": 0,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]}


def request(state: dict) -> tuple[list[dict], dict, str]:
    """What to send for the state's step: messages, the answer's schema, the step's name."""
    return state["messages"], STEPS[state["step"]][1], state["step"]


def _invalid(state: dict, error: str, answer: str) -> dict:
    return {**state, "step": DONE, "valid": False, "error": error, "answer": answer, "messages": []}


def advance(state: dict, text: str, attempts: int) -> dict:
    """The state after the model answered ``text``: the next step, the same step asked again with the
    error (at most ``attempts`` answers per step), or done (valid, or invalid with why)."""
    step, schema = state["step"], STEPS[state["step"]][1]
    state = {**state, "calls": state["calls"] + 1, "attempt": state["attempt"] + 1}
    try:
        answer = parse_answer(text, schema)
    except ValueError as exc:
        if state["attempt"] >= attempts:
            return _invalid(state, f"step {step}: no valid answer in {attempts} attempts; last error: {exc}", text)
        retry = [{"role": "assistant", "content": text},
                 {"role": "user", "content": f"That answer is invalid: {exc}. Answer again with JSON matching this "
                                             f"schema only: {json.dumps(schema)}"}]
        return {**state, "messages": state["messages"] + retry}
    keep = protected(state["class_name"], state["synonyms"])
    if step == "words":
        words = modifiable(answer["words"], state["caption"], keep)
        if not words:
            return _invalid(state, "step words: no modifiable word of the caption (the class and its synonyms are "
                                   "never offered)", text)
        return _ask({**state, "words": words}, "alternatives", words=json.dumps(words))
    if step == "alternatives":
        alternatives = {w: [a for a in answer["alternatives"].get(w, []) if a.lower() not in keep and a != w]
                        for w in state["words"]}
        edits = choose_edits(alternatives, np.random.default_rng(state["seed"]))
        if not edits:
            return _invalid({**state, "alternatives": alternatives}, "step alternatives: no usable alternative for "
                            "any word", text)
        return _ask({**state, "alternatives": alternatives, "edits": edits}, "captions", edits=json.dumps(edits))
    return {**state, "step": DONE, "captions": answer["captions"], "messages": []}


def to_rewrite(state: dict) -> Rewrite:
    """A finished dialogue as a ``Rewrite`` (every caption made with the chosen edits)."""
    return Rewrite(state["caption"], state["words"], state["alternatives"],
                   [state["edits"] for _ in state["captions"]], state["captions"], state["valid"], state["error"],
                   state["answer"], state["calls"])


class ChatWriter:
    """The language-model counterfactual writer (the reference code's three steps, with schemas and
    bounded retries instead of regexes, ``ast.literal_eval`` and endless loops), one caption at a time;
    ``stages.rewrites`` runs the same dialogue over a dataset with Ray Data's LLM processors."""

    def __init__(self, endpoint: ChatEndpoint, attempts: int = 3):
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self.endpoint, self.attempts = endpoint, attempts

    def write(self, caption: str, class_name: str, synonyms: list[str] = (), task: str = "image classification",
              seed: int = 0) -> Rewrite:
        state = start(caption, class_name, synonyms, task, seed)
        while state["step"] != DONE:
            state = advance(state, self.endpoint.complete(*request(state)), self.attempts)
        return to_rewrite(state)


class EndpointCaptioner:
    """Captions from a vision chat endpoint (OpenAI-compatible, an image sent as a PNG data URI):
    ``samples`` answers per image, joined as the transformers captioner joins its samples."""

    PROMPT = "Describe this image in one short sentence: the main object, its colours, the background."

    def __init__(self, endpoint: ChatEndpoint, samples: int = 2, prompt: str = PROMPT):
        self.endpoint, self.samples, self.prompt = endpoint, samples, prompt

    def caption(self, images: np.ndarray, seeds: list[int] | None = None) -> list[str]:
        """One caption per uint8 (N, C, H, W) image (``seeds`` unused: the endpoint samples)."""
        import base64
        import io

        from PIL import Image

        out = []
        for image in images:
            buf = io.BytesIO()
            Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buf, format="PNG")
            uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            messages = [{"role": "user", "content": [{"type": "text", "text": self.prompt},
                                                     {"type": "image_url", "image_url": {"url": uri}}]}]
            texts = [self.endpoint.complete(messages).strip() for _ in range(self.samples)]
            out.append(". ".join(dict.fromkeys(t.rstrip(".") for t in texts if t)))
        return out
