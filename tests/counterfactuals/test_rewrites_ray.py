"""Counterfactual captions over a dataset through Ray Data's LLM processor, against a real
chat-completions server on loopback whose answers depend on the request (so request order is free)."""

from __future__ import annotations

import json
import re

import pytest
import ray

from genstress_ray.counterfactuals import ChatEndpoint, EndpointError
from genstress_ray.stages.rewrites import write_counterfactuals

from counterfactuals.test_writers import ScriptedChat


def model(body: dict) -> str:
    """A scripted language model: captions with 'garbled' never answer validly; with 'shy' the first
    answer of each step is malformed; every other answer is right."""
    messages = body["messages"]
    prompt = messages[1]["content"]
    caption = re.search(r'[Cc]aption:? \\?"([^"]+)"', prompt).group(1)
    if "garbled" in caption or ("shy" in caption and len(messages) == 2):
        return "let me think about it"
    if "Which words" in prompt:
        return json.dumps({"words": ["red", "sign"]})  # "sign" is the class: dropped
    if "alternatives" in prompt:
        return json.dumps({"alternatives": {"red": ["blue", "green"]}})
    edits = json.loads(re.search(r"substitutions: (\[.*\])\. Keep", prompt).group(1))
    new = caption
    for word, alt in edits:
        new = new.replace(word, alt)
    return json.dumps({"captions": [new, new + " today"]})


def test_dialogues_run_as_ray_data_passes_with_retries_and_invalid_records(ray_cluster):
    server = ScriptedChat(model)
    try:
        rows = [{"source_id": f"s{i}", "caption": c, "class_name": "sign", "seed": i}
                for i, c in enumerate(["a red sign", "a shy red sign", "a garbled red sign", "a red sign at noon"])]
        out = {r["source_id"]: r for r in write_counterfactuals(ray.data.from_items(rows),
                                                                 ChatEndpoint(server.url, "scripted"), attempts=2)}
    finally:
        server.shutdown()
        server.server_close()
    assert set(out) == {"s0", "s1", "s2", "s3"}
    for sid in ("s0", "s1", "s3"):
        r = out[sid]
        assert r["valid"] and r["words"] == ["red"] and r["edits"][0][0][0] == "red"
        alt = r["edits"][0][0][1]
        assert alt in ("blue", "green") and r["captions"][0] == r["caption"].replace("red", alt)
    assert out["s0"]["calls"] == 3 and out["s1"]["calls"] == 6  # the shy one answered each step twice
    g = out["s2"]
    assert not g["valid"] and g["calls"] == 2 and g["answer"] == "let me think about it"
    assert "step words: no valid answer in 2 attempts" in g["error"]
    # Every request carried the step's schema; retries carried the error back.
    assert all("response_format" in body for body in server.requests)
    assert any("That answer is invalid" in b["messages"][-1]["content"] for b in server.requests)


def test_an_endpoint_that_does_not_speak_the_protocol_fails_named(ray_cluster):
    server = ScriptedChat(lambda body: None)
    server.replies = lambda body: (200, json.dumps({"answer": "hello"}))
    try:
        with pytest.raises(EndpointError, match="/chat/completions failed: .*chat-completions protocol"):
            write_counterfactuals(ray.data.from_items([{"caption": "a red sign", "class_name": "sign"}]),
                                  ChatEndpoint(server.url, "scripted"))
    finally:
        server.shutdown()
        server.server_close()


def test_vllm_engines_get_each_step_with_its_schema_as_structured_output():
    from genstress_ray.counterfactuals.chat import request, start
    from genstress_ray.counterfactuals.text import WORDS_SCHEMA
    from genstress_ray.stages.rewrites import VLLMEngine

    engine = VLLMEngine("models/llama", {"max_model_len": 2048}, concurrency=2, temperature=0.2, max_tokens=64)
    row = engine.payload(*request(start("a red sign", "sign")))
    assert row["messages"][1]["content"].startswith("Task: image classification")
    assert row["sampling_params"] == {"temperature": 0.2, "max_tokens": 64, "structured_outputs": {"json": WORDS_SCHEMA}}
    config = engine.config(batch_size=8)
    assert (config.model_source, config.concurrency, config.batch_size) == ("models/llama", 2, 8)
    assert config.engine_kwargs["max_model_len"] == 2048
    assert VLLMEngine.reply({"generated_text": '{"words": []}'}) == '{"words": []}'


@pytest.mark.skipif(not __import__("importlib").util.find_spec("vllm"), reason="vLLM is not installed here (a GPU "
                    "cluster's workers have it)")
def test_dialogues_run_on_vllm_engines(ray_cluster, tmp_path):
    from genstress_ray.stages.rewrites import VLLMEngine

    from models.factories import write_tiny_chat_lm

    write_tiny_chat_lm(tmp_path / "lm")
    rows = write_counterfactuals(ray.data.from_items([{"caption": "a red sign", "class_name": "sign"}]),
                                 VLLMEngine(str(tmp_path / "lm"), {"max_model_len": 1024}), attempts=2)
    # Random weights constrained to the schema: valid JSON each time, whatever words it picks.
    assert len(rows) == 1 and rows[0]["calls"] >= 1 and (rows[0]["valid"] or "step" in rows[0]["error"])


# Options of every language model Ray Data's LLM processor can run the dialogue on (LLM_BACKENDS).
LLM_BACKEND_OPTIONS = {"chat": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "attempts": 2},
                       "vllm": {"model_source": "models/llama", "attempts": 2}}


def test_every_llm_backend_has_test_options():
    from genstress_ray.counterfactuals import LLM_BACKENDS

    assert sorted(LLM_BACKENDS.names()) == sorted(LLM_BACKEND_OPTIONS)


@pytest.mark.parametrize("name", sorted(LLM_BACKEND_OPTIONS))
def test_an_llm_backend_is_built_from_the_writer_options_and_asks_each_step_with_its_schema(name):
    from genstress_ray.counterfactuals.chat import request, start
    from genstress_ray.counterfactuals.text import WORDS_SCHEMA
    from genstress_ray.stages.rewrites import _Http
    from genstress_ray.strategies.counterfactual import llm_backend

    llm, attempts = llm_backend({"writer": {"name": name, **LLM_BACKEND_OPTIONS[name]}})
    engine = _Http(llm) if isinstance(llm, ChatEndpoint) else llm
    row = engine.payload(*request(start("a red sign", "sign")))
    assert attempts == 2 and json.dumps(WORDS_SCHEMA) in json.dumps(row)
    assert "a red sign" in json.dumps(row)
    with pytest.raises(ValueError, match="strategy.writer: .*no_such_option"):
        llm_backend({"writer": {"name": name, **LLM_BACKEND_OPTIONS[name], "no_such_option": 1}})
