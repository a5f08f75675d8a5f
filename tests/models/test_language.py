"""A local causal language model as the counterfactual writer's LLM: a tiny random Llama chat model
built from a config, run through the writer's three steps with bounded retries."""

from __future__ import annotations

import pytest

from genstress_ray.counterfactuals import WRITERS, ChatWriter
from genstress_ray.models import ModelError
from genstress_ray.models.language import TransformersChat

from models.factories import write_tiny_chat_lm

VOCAB_WORDS = {"{", "}", "[", "]", '"', ":", ",", "words", "alternatives", "captions", "red", "blue", "sign",
               "street", "a", "on", "the", "assistant", "user", "system"}


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("chat-lm")
    write_tiny_chat_lm(folder)
    return str(folder)


def test_replies_are_sampled_from_the_model_and_seeded_by_the_request(chat_lm):
    llm = TransformersChat(chat_lm, max_new_tokens=12)
    messages = [{"role": "user", "content": "a red sign on the street"}]
    reply = llm.complete(messages)
    assert reply and set(reply.split()) <= VOCAB_WORDS  # decoded from the model's own vocabulary
    assert llm.complete(messages) == reply  # the same request, the same reply
    others = {llm.complete([{"role": "user", "content": f"a blue sign {i}"}]) for i in range(4)}
    assert len(others | {reply}) > 1


def test_a_model_that_never_answers_in_json_is_retried_then_recorded_invalid(chat_lm):
    writer = WRITERS.get("transformers")(chat_lm, attempts=2, max_new_tokens=8)
    assert isinstance(writer, ChatWriter)
    rewrite = writer.write("a red sign on the street", "sign", seed=3)
    assert not rewrite.valid and rewrite.calls == 2 and rewrite.captions == []
    assert "step words: no valid answer in 2 attempts" in rewrite.error
    assert rewrite.answer and set(rewrite.answer.split()) <= VOCAB_WORDS
    assert writer.write("a red sign on the street", "sign", seed=3).answer == rewrite.answer


def test_a_language_model_folder_missing_files_or_chat_template_is_named(chat_lm, tmp_path):
    import shutil

    broken = tmp_path / "lm"
    shutil.copytree(chat_lm, broken)
    (broken / "tokenizer_config.json").unlink()
    with pytest.raises(ModelError, match="language model folder .* lacks tokenizer_config.json"):
        TransformersChat(str(broken))
    plain = tmp_path / "plain"
    write_tiny_chat_lm(plain, chat_template=None)
    with pytest.raises(ModelError, match="no chat template"):
        TransformersChat(str(plain))
