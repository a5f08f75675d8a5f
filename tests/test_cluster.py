"""Several nodes: ``ray.cluster_utils.Cluster`` with three raylets on this machine, one with logical GPUs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Run in its own process: a test process's Ray is the session's single local cluster.
SCRIPT = r"""
import json, sys, threading, time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from genstress_ray.pipeline import run_campaign
from genstress_ray.storage import SHARD_MADE_BY, RunStore, read_shard_counts

cfg = json.loads(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
doomed = cluster.add_node(num_cpus=1)
cluster.add_node(num_cpus=1, num_gpus=2)  # logical GPUs: the stage still runs on CPU tensors
cluster.wait_for_nodes()
cfg["ray"] = {"address": cluster.address}
identify = Path(cfg["output"]) / "test" / "removed" / "identify"
removed = {}

def remove_mid_stage():
    while len(list(identify.glob("shard-*.parquet"))) < 2:
        time.sleep(0.05)
    removed["at_shards"] = len(list(identify.glob("shard-*.parquet")))
    removed["node"] = doomed.node_id
    cluster.remove_node(doomed)

threading.Thread(target=remove_mid_stage, daemon=True).start()
run_campaign(cfg, run_id="removed", stop_after="identify")
nodes_before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
run_campaign(cfg, run_id="clean", stop_after="identify")
out = {"node_removal": removed, "alive_after": len(nodes_before)}
for run in ("removed", "clean"):
    store = RunStore(cfg["output"], "test", run)
    table = store.read_table("identify", columns=["sample_id", "pred", "fault"])
    files = store.shard_files("identify")
    out[run] = {"rows": table.to_pylist(), "marker": store.marker("identify"),
                "nodes": sorted({read_shard_counts(store.fs, p, SHARD_MADE_BY)["node"] for p in files.values()})}
print("RESULT " + json.dumps(out))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_search_actors_spread_over_nodes_and_a_node_removed_mid_stage_loses_no_row(tiny_config, tmp_path):
    cfg = {**tiny_config, "shard_rows": 4, "strategy": {**tiny_config["strategy"], "draws": 2000},
           "resources": {"search": {"actors": 3, "num_cpus": 0.5, "threads": 1}}}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    removed, clean = out["removed"], out["clean"]
    assert out["alive_after"] == 2 and out["node_removal"]["at_shards"] < 12  # removed mid-stage
    assert len(clean["nodes"]) >= 2 and len(removed["nodes"]) >= 2  # the actors ran on several nodes
    ids = [r["sample_id"] for r in removed["rows"]]
    assert len(ids) == len(set(ids))  # no row twice
    assert removed["rows"] == clean["rows"]  # and none lost
    for key in ("candidates", "faults", "shards"):
        assert removed["marker"][key] == clean["marker"][key], key
