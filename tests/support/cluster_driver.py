"""The job driver of the node-loss tests, in a process of its own (one Ray cluster per process):

    python -m tests.support.cluster_driver --address 127.0.0.1:6379 --job job.json \
        --calls calls.jsonl --delay 0.5 --result result.json [--roster-on b]

Connects to the cluster (on the head node, where Ray attaches a driver on this machine), runs
`pipeline.builder.run` with `CountingLoader` (every model call logged with its pid, slowed by
`--delay` so the test can lose a node mid-run), and writes the summary, the cluster's node
counts and the roster's node to `--result`. `--roster-on NAME` starts each pass's roster on
worker node NAME instead of the driver's node (where `run` puts it): the node a test then loses
holds a helper actor of the pipeline. Exit 0 when the job finished, 1 with the error on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--calls", required=True)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--result", required=True)
    p.add_argument("--roster-on", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import ray
    import ray.data

    from pipeline.builder import run
    from pipeline.config import JobConfig
    from pipeline.runtime import roster as roster_module
    from pipeline.runtime.weights import ModelLoader
    from tests.support.counting import CountingLoader

    ray.init(address=args.address, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    job = JobConfig.model_validate_json(Path(args.job).read_text(encoding="utf-8"))
    nodes = ray.nodes()
    result: dict = {
        "driver_node": ray.get_runtime_context().get_node_id(),
        "head_node": next(n["NodeID"] for n in nodes if "node:__internal_head__" in n["Resources"]),
        "roster_nodes": [],  # where each pass's roster actually ran
        # Node id -> LocalCluster name; a dead node's resources are no longer listed.
        "node_names": {n["NodeID"]: _name(n) for n in nodes if n["Alive"]},
    }
    target = None
    if args.roster_on:
        resource = f"node_{args.roster_on}"
        [target] = [n["NodeID"] for n in nodes if n["Alive"] and resource in n["Resources"]]
    start = roster_module.ActorRoster.start.__func__

    def start_and_locate(cls, node_id=None):
        roster = start(cls, node_id=target or node_id)
        where = roster._actor.__ray_call__.remote(
            lambda self: ray.get_runtime_context().get_node_id()
        )
        result["roster_nodes"].append(ray.get(where, timeout=60))
        return roster

    roster_module.ActorRoster.start = classmethod(start_and_locate)
    t0 = time.time()
    loader = CountingLoader(ModelLoader(job), args.calls, delay_s=args.delay)
    try:
        summary = run(job, loader=loader)
        result["summary"] = summary.as_dict()
        code = 0
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
        code = 1
    result["wall_s"] = round(time.time() - t0, 2)
    result["finished_at"] = time.time()
    nodes = ray.nodes()
    result["node_names"].update({n["NodeID"]: _name(n) for n in nodes if n["Alive"]})
    result["nodes_alive"] = sum(n["Alive"] for n in nodes)
    result["nodes_dead"] = sum(not n["Alive"] for n in nodes)
    with open(args.result, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return code


def _name(node: dict) -> str:
    """The name a `LocalCluster` node was started under (its `node_<name>` resource)."""
    if "node:__internal_head__" in node["Resources"]:
        return "head"
    names = [r[len("node_") :] for r in node["Resources"] if r.startswith("node_")]
    return names[0] if names else "?"


if __name__ == "__main__":
    sys.exit(main())
