"""Ray Data callable classes: each actor loads its models from URIs and applies a strategy to shards.

Actors get model references (URIs and architecture names), never weights, so a restarted actor can
rebuild itself. Each shard is written as one Parquet file with the ``samples`` schema of DESIGN.md
(``stages.shards``), readable by pandas, DuckDB or Ray Data without this package. A strategy names
its stage class in its ``Strategy`` (``genstress_ray.strategies``).
"""

from genstress_ray.stages.base import ModelStage, candidate_table
from genstress_ray.stages.counterfactual import CounterfactualStage
from genstress_ray.stages.defuse import DefuseSearch, RegionDecode
from genstress_ray.stages.kldb import KldbSearch
from genstress_ray.stages.shards import run_sharded
from genstress_ray.stages.style import MixingSearch, TruncationSearch

__all__ = ["CounterfactualStage", "DefuseSearch", "KldbSearch", "MixingSearch", "ModelStage", "RegionDecode", "TruncationSearch",
           "candidate_table", "run_sharded"]
