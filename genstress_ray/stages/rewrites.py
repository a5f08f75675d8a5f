"""Counterfactual captions at scale: the language-model dialogue of ``counterfactuals.chat`` over a
dataset, its HTTP calls made by Ray Data's LLM processor (``ray.data.llm.build_processor`` with an
``HttpRequestProcessorConfig``: batching, concurrency and a request rate for the endpoint).

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


def write_counterfactuals(ds: ray.data.Dataset, endpoint: ChatEndpoint, attempts: int = 3, task: str =
                          "image classification", concurrency: int = 1, batch_size: int = 16,
                          qps: int | None = None) -> list[dict]:
    """Counterfactual captions for every row of ``ds`` (``caption``, ``class_name``, optional ``synonyms``
    and ``seed``; other columns are kept): one row each with the ``Rewrite`` fields.

    Raises:
        EndpointError: the endpoint is unreachable or does not speak the protocol (named).
    """
    from ray.data.expressions import col
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    url = endpoint.url
    config = HttpRequestProcessorConfig(url=url, headers=endpoint.headers(), concurrency=concurrency,
                                        batch_size=batch_size, qps=qps)

    def begin(row: dict) -> dict:
        state = start(row["caption"], row["class_name"], list(row.get("synonyms") or ()), task, int(row.get("seed", 0)))
        return {**row, "dialogue": json.dumps(state), "step": state["step"]}

    def answered(row: dict) -> dict:
        state = advance(json.loads(row["dialogue"]), _reply(row["http_response"]), attempts)
        kept = {k: v for k, v in row.items() if k not in ("http_response", "payload")}
        return {**kept, "dialogue": json.dumps(state), "step": state["step"]}

    processor = build_processor(config, preprocess=lambda row: {**row, "payload": endpoint.body(
        *request(json.loads(row["dialogue"])))}, postprocess=answered)
    states = ds.map(begin).materialize()
    for _ in range(PASSES_PER_ATTEMPT * attempts):
        pending = states.filter(expr=col("step") != DONE)
        if pending.count() == 0:
            break
        try:
            states = states.filter(expr=col("step") == DONE).union(processor(pending)).materialize()
        except Exception as exc:  # the HTTP stage's errors arrive wrapped in Ray's
            raise EndpointError(f"chat endpoint {url} failed: {_cause(exc)}") from exc
    out = []
    for row in states.take_all():
        rewrite = to_rewrite(json.loads(row.pop("dialogue")))
        row.pop("step")
        out.append({**row, **rewrite.__dict__})
    return out
