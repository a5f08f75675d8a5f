"""Several nodes: ``ray.cluster_utils.Cluster`` with four raylets on this machine, one with logical GPUs.

A node is removed while it holds work in flight, checked rather than assumed: the generator
(``tests.models.factories.GatedVAE``) holds each search actor inside a batch, its shard unwritten, until
the test has removed a node one of them reported from; then the gate opens and the run goes on.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from genstress_ray.models import get_model, save_checkpoint

from conftest import TINY_VAE

# Run in its own process: a test process's Ray is the session's single local cluster.
SCRIPT = r"""
import json, sys, threading, time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from genstress_ray.pipeline import run_campaign
from genstress_ray.storage import SHARD_MADE_BY, RunStore, read_shard_counts

cfg, gate = json.loads(sys.argv[1]), Path(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
for _ in range(2):
    cluster.add_node(num_cpus=1)
cluster.add_node(num_cpus=1, num_gpus=2)  # logical GPUs: the stage still runs on CPU tensors
cluster.wait_for_nodes()
cfg["ray"] = {"address": cluster.address}
run = Path(cfg["output"]) / "test" / "removed"
removals, failures = [], []

def remove_a_busy_node(stage, generation, after=None):
    if after is not None:  # close the gate once the stage before has finished
        while not (run / after / "_COMPLETE").exists():
            time.sleep(0.02)
    (gate / "closed").write_text(str(generation))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        busy = {p.name.split("-")[2] for p in gate.glob(f"busy-{generation}-*")}
        nodes = [n for n in cluster.worker_nodes if n.node_id in busy]
        if nodes:
            break
        time.sleep(0.05)
    else:
        failures.append(f"{stage}: no search actor on a worker node reached the gate")
        (gate / f"open-{generation}").write_text("")
        return
    written = len(list((run / stage).glob("shard-*.parquet")))
    cluster.remove_node(nodes[0])
    removals.append({"stage": stage, "node": nodes[0].node_id, "shards_written_before": written,
                     "held_on_node": sum(p.name.split("-")[2] == nodes[0].node_id
                                         for p in gate.glob(f"busy-{generation}-*"))})
    (gate / f"open-{generation}").write_text("")

def remove_during_both():
    remove_a_busy_node("identify", 1)
    remove_a_busy_node("region_samples", 2, after="regions")

watcher = threading.Thread(target=remove_during_both, daemon=True)
watcher.start()
run_campaign(cfg, run_id="removed", stop_after="region_samples")
watcher.join(timeout=60)
(gate / "closed").unlink()
alive = sum(n["Alive"] for n in ray.nodes())
run_campaign(cfg, run_id="clean", stop_after="region_samples")
out = {"removals": removals, "failures": failures, "alive_after": alive}
for name in ("removed", "clean"):
    store = RunStore(cfg["output"], "test", name)
    out[name] = {}
    for stage, columns in (("identify", ["sample_id", "pred", "fault"]),
                           ("region_samples", ["sample_id", "region_id", "draw", "pred"])):
        files = store.shard_files(stage)
        out[name][stage] = {
            "rows": store.read_table(stage, columns=columns).to_pylist(), "marker": store.marker(stage),
            "shards": len(files),
            "nodes": sorted({read_shard_counts(store.fs, p, SHARD_MADE_BY)["node"] for p in files.values()})}
print("RESULT " + json.dumps(out))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_removing_a_node_that_holds_a_batch_in_flight_loses_and_repeats_no_row(tiny_config, tmp_path):
    """For identify and for region samples: the removed node held a search actor inside a batch (it
    said so from inside ``process_batch``), fewer shards than the stage writes were done, and the run
    still ends with exactly the rows of an undisturbed run, none twice."""
    gate = tmp_path / "gate"
    gate.mkdir()
    vae = str(tmp_path / "vae.safetensors")
    save_checkpoint(get_model("beta_vae", **TINY_VAE), vae, "beta_vae", TINY_VAE)
    cfg = {**tiny_config, "shard_rows": 4,
           "generator": {"uri": vae, "factory": "tests.models.factories:gated_vae", "params": {"gate": str(gate)}},
           "strategy": {**tiny_config["strategy"], "draws": 50},
           "reduce": {**tiny_config["reduce"], "samples_per_region": 8},
           "resources": {"search": {"actors": 3, "num_cpus": 0.5, "threads": 1},
                         "region_samples": {"actors": 3, "num_cpus": 0.5, "threads": 1, "batch_size": 16}}}
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cfg), str(gate)], capture_output=True,
                          text=True, timeout=900, cwd=root, env=env)  # every node's workers import the factory
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert out["failures"] == []
    assert [r["stage"] for r in out["removals"]] == ["identify", "region_samples"]
    assert out["alive_after"] == 2 and len({r["node"] for r in out["removals"]}) == 2
    removed, clean = out["removed"], out["clean"]
    for removal in out["removals"]:
        stage = removal["stage"]
        # Work in flight on the node: an actor there held inside a batch, the stage not yet done.
        assert removal["held_on_node"] >= 1
        assert removal["shards_written_before"] < clean[stage]["shards"], removal
        ids = [r["sample_id"] for r in removed[stage]["rows"]]
        assert len(ids) == len(set(ids)), stage  # no row twice
        assert removed[stage]["rows"] == clean[stage]["rows"], stage  # and none lost
        for key in ("candidates", "shards"):
            assert removed[stage]["marker"][key] == clean[stage]["marker"][key], (stage, key)
    assert len(removed["identify"]["nodes"]) >= 2  # the actors ran on several nodes
    assert clean["region_samples"]["shards"] >= 3
