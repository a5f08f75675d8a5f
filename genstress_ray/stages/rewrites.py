"""Counterfactual captions at scale: the language-model dialogue of ``counterfactuals.chat`` over a
dataset, its calls made by Ray Data's LLM processor (``ray.data.llm.build_processor``): to a
chat-completions endpoint (``ChatEndpoint``: an ``HttpRequestProcessorConfig`` with batching,
concurrency and a request rate), or to vLLM engines that Ray Data starts on the cluster's GPUs
(``VLLMEngine``: a ``vLLMEngineProcessorConfig``; each step's JSON schema constrains decoding there).

Each pass sends every caption's pending step once; answers advance the dialogues (next step, the
same step again with the error, or done), and the next pass sends what is still pending. A dialogue
ends within 3 steps x ``attempts`` passes, valid or recorded invalid with the error and the last
answer. The dialogue travels between passes as a JSON column.

Example:
    >>> rows = write_counterfactuals(ray.data.from_items([{"source_id": "gtsrb:test:0",  # doctest: +SKIP
    ...     "caption": "a red sign on a street", "class_name": "stop"}]), ChatEndpoint(url, "llama"))
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import ray

from genstress_ray.counterfactuals.chat import (DONE, STEPS, ChatEndpoint, EndpointError, advance, request, start,
                                                to_rewrite)
from genstress_ray.storage import short_cause

PASSES_PER_ATTEMPT = len(STEPS)


def _reply(response) -> str:
    try:
        return response["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise EndpointError(f"the endpoint did not answer in the chat-completions protocol: {str(response)[:300]}") \
            from None


def _cause(exc: BaseException) -> str:
    """Our own error from inside a Ray worker (it arrives as text in Ray's wrapper), else the innermost
    cause, in one line."""
    found = re.search(r"EndpointError: (.+)", str(exc))
    return found.group(1).strip() if found else short_cause(exc)


@dataclass
class VLLMEngine:
    """vLLM engines run by Ray Data itself (``vLLMEngineProcessorConfig``): ``model_source`` a local model
    folder or URI on the cluster, ``engine_kwargs`` vLLM's (``tensor_parallel_size``, ``max_model_len``,
    ...), ``concurrency`` engines, each on ``accelerator_type`` GPUs. Needs vLLM on the workers."""

    model_source: str
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    concurrency: int = 1
    accelerator_type: str | None = None
    temperature: float = 0.7
    max_tokens: int = 256

    def config(self, batch_size: int, **_):
        from ray.data.llm import vLLMEngineProcessorConfig

        return vLLMEngineProcessorConfig(model_source=self.model_source, engine_kwargs=self.engine_kwargs,
                                         concurrency=self.concurrency, accelerator_type=self.accelerator_type,
                                         batch_size=batch_size)

    def payload(self, messages: list[dict], schema: dict, name: str) -> dict:
        """The row's request: the chat (templated by Ray Data's stage) and sampling, the answer
        constrained to ``schema`` (vLLM's structured outputs)."""
        return {"messages": messages, "sampling_params": {"temperature": self.temperature,
                                                          "max_tokens": self.max_tokens,
                                                          "structured_outputs": {"json": schema}}}

    @staticmethod
    def reply(row: dict) -> str:
        return row.get("generated_text") or ""

    def __str__(self) -> str:
        return f"vLLM engine {self.model_source}"


class _Http:
    """A ``ChatEndpoint`` as Ray Data's HTTP request processor sees it."""

    def __init__(self, endpoint: ChatEndpoint):
        self.endpoint = endpoint

    def config(self, batch_size: int, concurrency: int, qps: int | None):
        from ray.data.llm import HttpRequestProcessorConfig

        return HttpRequestProcessorConfig(url=self.endpoint.url, headers=self.endpoint.headers(),
                                          concurrency=concurrency, batch_size=batch_size, qps=qps)

    def payload(self, messages: list[dict], schema: dict, name: str) -> dict:
        return {"payload": self.endpoint.body(messages, schema, name)}

    @staticmethod
    def reply(row: dict) -> str:
        return _reply(row["http_response"])

    def __str__(self) -> str:
        return f"chat endpoint {self.endpoint.url}"


def write_counterfactuals(ds: ray.data.Dataset, llm: ChatEndpoint | VLLMEngine, attempts: int = 3, task: str =
                          "image classification", concurrency: int = 1, batch_size: int = 16,
                          qps: int | None = None) -> list[dict]:
    """Counterfactual captions for every row of ``ds`` (``caption``, ``class_name``, optional ``synonyms``
    and ``seed``; other columns are kept): one row each with the ``Rewrite`` fields. ``llm``: a
    chat-completions endpoint (``concurrency`` and ``qps`` are its request workers and rate) or vLLM
    engines on the cluster.

    Raises:
        EndpointError: the endpoint is unreachable or does not speak the protocol, or the engines fail
            (named).
    """
    from ray.data.expressions import col
    from ray.data.llm import build_processor

    engine = _Http(llm) if isinstance(llm, ChatEndpoint) else llm
    config = engine.config(batch_size=batch_size, concurrency=concurrency, qps=qps)

    def begin(row: dict) -> dict:
        state = start(row["caption"], row["class_name"], list(row.get("synonyms") or ()), task, int(row.get("seed", 0)))
        return {**row, "dialogue": json.dumps(state), "step": state["step"]}

    def answered(row: dict) -> dict:
        state = advance(json.loads(row["dialogue"]), engine.reply(row), attempts)
        kept = {k: row[k] for k in columns}  # what the processor added is dropped
        return {**kept, "dialogue": json.dumps(state), "step": state["step"]}

    processor = build_processor(config, preprocess=lambda row: {**row, **engine.payload(
        *request(json.loads(row["dialogue"])))}, postprocess=answered)
    states = ds.map(begin).materialize()
    columns = states.columns()
    for _ in range(PASSES_PER_ATTEMPT * attempts):
        pending = states.filter(expr=col("step") != DONE)
        if pending.count() == 0:
            break
        try:
            states = states.filter(expr=col("step") == DONE).union(processor(pending)).materialize()
        except Exception as exc:  # the HTTP stage's errors arrive wrapped in Ray's
            raise EndpointError(f"{engine} failed: {_cause(exc)}") from exc
    out = []
    for row in states.take_all():
        rewrite = to_rewrite(json.loads(row.pop("dialogue")))
        row.pop("step")
        out.append({**row, **rewrite.__dict__})
    return out
