"""A local language model for the counterfactual writer: a ``transformers`` causal-LM folder (a chat
model with its tokenizer's chat template), answering the writer's messages as a chat endpoint would.

It speaks the same ``complete(messages, schema, name)`` as ``counterfactuals.ChatEndpoint``, so the
three steps, their JSON schemas and the bounded retries are the same code on either. Without an
engine that constrains decoding, the schema is only asked for in the prompt (the step prompts spell
out the JSON they want); answers that miss it are retried and then recorded invalid.

Sampling is seeded from the request itself, so a caption's dialogue is the same however the captions
are batched or spread over actors. Nothing in the folder runs as code (``trust_remote_code`` off).

Example:
    >>> llm = TransformersChat("models/llama-2-13b-chat", device="cuda")  # doctest: +SKIP
    >>> ChatWriter(llm).write("a red stop sign on a sunny street", "stop sign")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import zlib

import torch

from genstress_ray.models.folders import load_transformers_folder
from genstress_ray.models.protocols import ModelError

NEEDED = ("config.json", "tokenizer_config.json")


class TransformersChat:
    """A local causal LM folder (a path or an fsspec URI) behind the chat ``complete`` of the writer."""

    def __init__(self, uri: str, max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9,
                 seed: int = 0, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer, self.model = load_transformers_folder(uri, "language model", "causal language model", NEEDED,
                                                              AutoTokenizer, AutoModelForCausalLM, device)
        if not self.tokenizer.chat_template:
            raise ModelError(f"language model folder {uri!r}: its tokenizer has no chat template (a chat model's "
                             "tokenizer_config.json carries one)")
        self.uri, self.seed, self.device = uri, seed, device
        self.sampling = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0, "top_p": top_p,
                         **({"temperature": temperature} if temperature > 0 else {})}

    @torch.no_grad()
    def complete(self, messages: list[dict], schema: dict | None = None, name: str = "answer") -> str:
        """The model's reply to ``messages`` (``schema`` is in the prompt already; see the module)."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True).to(self.device)
        torch.manual_seed(self.seed + zlib.crc32(json.dumps(messages, sort_keys=True).encode()))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = self.model.generate(**ids, pad_token_id=pad, **self.sampling)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
