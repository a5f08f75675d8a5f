"""Counterfactual captions for the LLM-counterfactual method: a caption's label-preserving rewrites,
written by a language model (``chat``) or offline from attribute lexicons (``lexicon``), registered
in ``WRITERS``. Plain Python: no Ray, no torch."""

from genstress_ray.counterfactuals.chat import ChatEndpoint, ChatWriter, EndpointError, parse_answer
from genstress_ray.counterfactuals.lexicon import LEXICONS, LexiconWriter
from genstress_ray.counterfactuals.text import Rewrite, protected, substitute
from genstress_ray.registry import Registry

# name -> a factory taking the writer's options (a config's ``writer`` section).
WRITERS: Registry = Registry("counterfactual writer")
WRITERS.register("lexicon", lambda **options: LexiconWriter(**options))
WRITERS.register("chat", lambda attempts=3, **endpoint: ChatWriter(ChatEndpoint(**endpoint), attempts))

__all__ = ["LEXICONS", "WRITERS", "ChatEndpoint", "ChatWriter", "EndpointError", "LexiconWriter", "Rewrite",
           "parse_answer", "protected", "substitute"]
