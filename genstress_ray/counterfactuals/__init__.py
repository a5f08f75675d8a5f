"""Counterfactual captions for the LLM-counterfactual method: a caption's label-preserving rewrites,
written by a language model (``chat``) or offline from attribute lexicons (``lexicon``), registered
in ``WRITERS``. Plain Python: no Ray, no torch."""

from genstress_ray.counterfactuals.chat import ChatEndpoint, ChatWriter, EndpointCaptioner, EndpointError, parse_answer
from genstress_ray.counterfactuals.control import CONTROLS
from genstress_ray.counterfactuals.lexicon import LEXICONS, LexiconWriter
from genstress_ray.counterfactuals.text import Rewrite, protected, substitute
from genstress_ray.registry import Registry, resolve

# name -> a factory taking the writer's options (a config's ``writer`` section).
WRITERS: Registry = Registry("counterfactual writer", ValueError)
WRITERS.register("lexicon", lambda **options: LexiconWriter(**options))
WRITERS.register("chat", lambda attempts=3, **endpoint: ChatWriter(ChatEndpoint(**endpoint), attempts))
WRITERS.register("transformers", lambda uri, attempts=3, **options: ChatWriter(resolve(
    "genstress_ray.models.language:TransformersChat")(uri, **options), attempts))
# name -> (language model, attempts) for Ray Data's LLM processor (``strategy.llm_processor``): the
# writer's dialogue over the whole search set at once, before regeneration (``stages.rewrites``).
LLM_BACKENDS: Registry = Registry("language model for the LLM processor", ValueError)
LLM_BACKENDS.register("chat", lambda attempts=3, **endpoint: (ChatEndpoint(**endpoint), attempts))
LLM_BACKENDS.register("vllm", lambda attempts=3, **engine: (resolve("genstress_ray.stages.rewrites:VLLMEngine")(
    **engine), attempts))
# name -> a captioner factory: a transformers image-to-text folder, or a vision chat endpoint.
CAPTIONERS: Registry = Registry("captioner", ValueError)
CAPTIONERS.register("transformers", lambda uri, **options: resolve(
    "genstress_ray.models.captioners:TransformersCaptioner")(uri, **options))
CAPTIONERS.register("chat", lambda samples=2, **endpoint: EndpointCaptioner(ChatEndpoint(**endpoint), samples))

__all__ = ["CAPTIONERS", "CONTROLS", "LEXICONS", "LLM_BACKENDS", "WRITERS", "ChatEndpoint", "ChatWriter", "EndpointCaptioner", "EndpointError",
           "LexiconWriter", "Rewrite", "parse_answer", "protected", "substitute"]
