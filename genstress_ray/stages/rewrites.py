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
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from genstress_ray.counterfactuals import CAPTIONERS
from genstress_ray.counterfactuals.chat import (DONE, STEPS, ChatEndpoint, EndpointError, advance, request, start,
                                                to_rewrite)
from genstress_ray.counterfactuals.text import Rewrite
from genstress_ray.stages.shards import bytes_table, read_shards, table_bytes
from genstress_ray.faults import short_cause
from genstress_ray.storage import REWRITES_SCHEMA, RunStore

log = logging.getLogger(__name__)
PASSES_PER_ATTEMPT = len(STEPS)
JSON_FIELDS = ("words", "alternatives", "edits", "captions")  # stored as JSON text


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
                          qps: int | None = None, synonyms: dict[str, list[str]] | None = None) -> list[dict]:
    """Counterfactual captions for every row of ``ds`` (``caption``, ``class_name``, optional ``synonyms``
    and ``seed``; other columns are kept): one row each with the ``Rewrite`` fields. ``llm``: a
    chat-completions endpoint (``concurrency`` and ``qps`` are its request workers and rate) or vLLM
    engines on the cluster. ``synonyms``: by class name, for rows without their own.

    Raises:
        EndpointError: the endpoint is unreachable or does not speak the protocol, or the engines fail
            (named).
    """
    from ray.data.expressions import col
    from ray.data.llm import build_processor

    engine = _Http(llm) if isinstance(llm, ChatEndpoint) else llm
    config = engine.config(batch_size=batch_size, concurrency=concurrency, qps=qps)

    def begin(row: dict) -> dict:
        own = row.get("synonyms")
        words = list(own) if own is not None and len(own) else (synonyms or {}).get(row["class_name"], [])
        state = start(row["caption"], row["class_name"], words, task, int(row.get("seed", 0)))
        return {**row, "dialogue": json.dumps(state), "step": state["step"]}

    def answered(row: dict) -> dict:
        state = advance(json.loads(row["dialogue"]), engine.reply(row), attempts)
        kept = {k: row[k] for k in columns}  # what the processor added is dropped
        return {**kept, "dialogue": json.dumps(state), "step": state["step"]}

    processor = build_processor(config, preprocess=lambda row: {**row, **engine.payload(
        *request(json.loads(row["dialogue"])))}, postprocess=answered)
    states = ds.map(begin).materialize()
    columns = states.columns()
    for n in range(PASSES_PER_ATTEMPT * attempts):
        pending = states.filter(expr=col("step") != DONE)
        waiting = pending.count()
        if waiting == 0:
            break
        log.info("rewrites: pass %d (of at most %d), %d dialogues waiting for %s", n + 1,
                 PASSES_PER_ATTEMPT * attempts, waiting, engine)
        # One processor run per step, one after the other: a step's requests share one payload shape
        # (its schema), and Ray Data cannot join blocks whose nested Arrow types differ.
        steps = [pending.filter(expr=col("step") == step) for step in STEPS]
        try:
            answered = [processor(part).materialize() for part in steps if part.count()]
            states = states.filter(expr=col("step") == DONE).union(*answered).materialize()
        except Exception as exc:  # the HTTP stage's errors arrive wrapped in Ray's
            raise EndpointError(f"{engine} failed: {_cause(exc)}") from exc
    out = []
    for row in states.take_all():
        rewrite = to_rewrite(json.loads(row.pop("dialogue")))
        row.pop("step")
        out.append({**row, **rewrite.__dict__})
    return out


# ---- as a stage of a counterfactual campaign ---------------------------------------------------
class Captioning:
    """Ray Data actor: the source rows of a batch of shards -> one row per image with its caption
    (the strategy's captioner, on the actor's GPU; without one, its caption template), class name and
    seed (the source's own, as the search draws it)."""

    def __init__(self, params: dict, class_names: list[str], image_shape, seed: int, threads: int = 1):
        self.params, self.class_names, self.image_shape, self.seed = params, class_names, tuple(image_shape), seed
        self.threads, self.captioner, self.loaded = threads, None, False

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from genstress_ray.strategies.counterfactual import _plugin, caption_sources, source_seed

        if not self.loaded:  # on the thread that runs the batches (see ModelStage)
            torch.set_num_threads(self.threads)
            device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
            spec = self.params.get("captioner")
            self.captioner = _plugin(CAPTIONERS, spec, "captioner", device) if spec else None
            self.loaded = True
        out: dict[str, list] = {"source_id": [], "caption": [], "class_name": [], "seed": []}
        for payload in batch["rows"]:
            rows = bytes_table(payload)
            ids, labels = rows["source_id"].to_pylist(), rows["source_label"].to_numpy()
            images = np.frombuffer(b"".join(rows["image"].to_pylist()), np.uint8).reshape(len(ids), *self.image_shape)
            seeds = [source_seed(self.seed, s) for s in ids]
            out["caption"] += caption_sources(self.captioner, self.params["caption_template"], self.class_names,
                                              images, labels, seeds)
            out["source_id"] += ids
            out["class_name"] += [self.class_names[int(y)] for y in labels]
            out["seed"] += seeds
        return out


def rewrite_record(row: dict) -> dict:
    """A ``rewrites`` table row from ``write_counterfactuals``'s."""
    return {k: json.dumps(row[k]) if k in JSON_FIELDS else row[k] for k in REWRITES_SCHEMA.names}


def stored_rewrites(store: RunStore) -> dict[str, Rewrite]:
    """The run's ``rewrites`` table, by source id."""
    rows = store.read_table("rewrites").to_pylist()
    return {r.pop("source_id"): Rewrite(**{k: json.loads(v) if k in JSON_FIELDS else v for k, v in r.items()})
            for r in rows}


def prepare_rewrites(ctx, constructor: dict, progress=None) -> dict | None:
    """The counterfactual captions of every search image, written before the search regenerates any
    (``strategy.llm_processor``): the images are read and captioned by actors, then the writer's
    dialogues run through Ray Data's LLM processor (``write_counterfactuals``), and the rewrites land
    in the run's ``rewrites`` table, which the search's actors read. Done once: a finished table is
    reused when the run resumes. Returns the stage's counts (None without ``llm_processor``)."""
    from genstress_ray.strategies.counterfactual import llm_backend

    params, store = ctx.cfg.strategy, ctx.store
    if params.llm_processor is None:
        return None
    if store.is_complete("rewrites"):
        log.info("stage rewrites: already complete, reused")
        return store.marker("rewrites")
    log.info("stage rewrites: running")
    started = time.time()
    store.begin_stage("rewrites")
    llm, attempts = llm_backend(params.model_dump())
    source, resources = ctx.search_source, ctx.cfg.resources.search
    shards = source.shards(ctx.cfg.shard_rows)
    ds = ray.data.from_items([{"shard": s.name, "rows": table_bytes(s.rows), "counts": "{}"} for s in shards],
                             override_num_blocks=len(shards))
    if source.streaming:
        ds = ds.map_batches(read_shards, batch_size=1, batch_format="numpy", fn_kwargs={"source": source},
                            num_cpus=resources.read_cpus)
    ds = ds.map_batches(Captioning, batch_size=1, batch_format="numpy", **resources.ray_args(),
                        fn_constructor_kwargs={"params": params.model_dump(), "class_names": ctx.class_names,
                                               "image_shape": ctx.image_shape, "seed": ctx.cfg.seed,
                                               "threads": resources.torch_threads()})
    p = params.llm_processor
    rows = write_counterfactuals(ds, llm, attempts, params.task, p.concurrency, p.batch_size, p.qps, params.synonyms)
    store.write_table("rewrites", pa.Table.from_pylist([rewrite_record(r) for r in rows], REWRITES_SCHEMA))
    info = {"sources": len(rows), "llm_calls": sum(r["calls"] for r in rows),
            "rewrites_invalid": sum(not r["valid"] for r in rows), "seconds": round(time.time() - started, 3)}
    store.complete_stage("rewrites", info)
    log.info("stage rewrites: done in %.1fs (%d sources, %d language-model calls, %d invalid)", info["seconds"],
             info["sources"], info["llm_calls"], info["rewrites_invalid"])
    return info
