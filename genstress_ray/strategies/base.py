"""What a search strategy is to the rest of the package: one ``Strategy`` registered in ``STRATEGIES``.

A strategy declares its parameter model (a section ``strategy:`` of the campaign config), the kind of
generator it needs, the source rows its search starts from, its Ray stage, how its candidates are
scored, what ``genstress assess`` measures and which report section shows it. The config's strategy
union, ``genstress --help`` and the report read this registry. README, "Architecture", says which
files a new strategy touches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from genstress_ray.registry import Registry


class StrategyParams(BaseModel):
    """Base of every strategy's parameters: unknown fields, infinity and NaN are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str

    @property
    def plugin(self) -> "Strategy":
        return STRATEGIES.get(self.name)

    @property
    def generator_kind(self) -> str:
        return self.plugin.generator_kind

    @property
    def needs_masks(self) -> bool:
        """Whether the search needs segmentation masks with its source images."""
        return False


@dataclass(frozen=True)
class Strategy:
    """A search strategy, as registered.

    Attributes:
        name: the value of ``strategy.name``.
        params: its parameter model (a ``StrategyParams`` with ``name: Literal[<name>]``).
        generator_kind: the model kind its generator must be (``genstress_ray.models.MODEL_KINDS``).
        source_rows: ``(params, search catalog, generator) -> pa.Table``: the rows the search starts from
            (cut into shards of ``shard_rows``); None: the ``data.search`` images themselves
            (``data.rows_table``), streamed from their source. ``resources.search.batch_size`` rows go
            to the stage at a time.
        stage: ``"module:Class"`` of its Ray Data stage (imported when a run starts: no Ray here).
        assess: ``"module:function"`` ``(context, classifier) -> dict``: what ``genstress assess`` measures.
        report: ``"module:function"`` ``(assessment dict) -> html``: the report's assessment section.
        boundary: for strategies whose candidates are scored against a set of classes rather than the
            intended class: ``(params, class_names, temperature) -> spec`` (``temperature()`` fits one).
        check_generator: ``(params, generator)``, raising ValueError when the generator cannot serve.
        prepare: ``"module:function"`` ``(context, stage constructor, progress) -> dict | None``: work
            done over the whole search set before its shards (a stage of its own, resumed whole).
        segmentation: whether it can test a segmentation model (``classifier.task: segmentation``):
            its stage scores a ``Segmenter`` against each source's mask.
        fidelity: whether its search perturbs the generator's encodings of the search images, so the
            classifier must recognise the generator's reconstructions for a fault to mean anything
            (the run checks it first: ``context.generator_fidelity``).
    """

    name: str
    params: type[StrategyParams]
    generator_kind: str
    source_rows: Callable[[Any, Any, Any], pa.Table] | None
    stage: str
    assess: str
    report: str
    boundary: Callable[[Any, list[str], Callable[[], float]], dict] | None = None
    check_generator: Callable[[Any, Any], None] | None = None
    prepare: str | None = None
    segmentation: bool = False
    fidelity: bool = False


STRATEGIES: Registry[Strategy] = Registry("strategy")


def register_strategy(strategy: Strategy) -> Strategy:
    """Add a strategy (before ``genstress_ray.config`` is imported: the config's union is built then)."""
    return STRATEGIES.register(strategy.name, strategy)
