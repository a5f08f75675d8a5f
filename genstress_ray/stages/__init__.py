"""Ray Data callable classes: each actor loads its models from URIs and applies a strategy to batches.

Actors get model references (URIs and architecture names), never weights, so a restarted actor can
rebuild itself. Each batch comes back as an Arrow table with the ``samples`` schema of DESIGN.md, so
the Parquet files are readable by pandas, DuckDB or Ray Data without this package.
"""

from genstress_ray.stages.base import (ModelRef, StageCounters, candidate_table, load_classifier, load_generator,
                                       png_bytes)
from genstress_ray.stages.defuse import DefuseSearch, RegionDecode
from genstress_ray.stages.kldb import KldbSearch
from genstress_ray.stages.style import MixingSearch, TruncationSearch
from genstress_ray.storage import REGION_SAMPLES_SCHEMA, SAMPLES_SCHEMA

# Strategy name -> the Ray stage that runs it. A new strategy is one new stage registered here.
SEARCH_STAGES = {"defuse": DefuseSearch, "truncation": TruncationSearch, "mixing": MixingSearch, "kldb": KldbSearch}

__all__ = ["REGION_SAMPLES_SCHEMA", "SAMPLES_SCHEMA", "SEARCH_STAGES", "DefuseSearch", "KldbSearch", "MixingSearch", "ModelRef",
           "RegionDecode", "StageCounters", "TruncationSearch", "candidate_table", "load_classifier",
           "load_generator", "png_bytes"]
