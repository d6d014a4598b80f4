"""A node lost mid-run on a real multi-node Ray cluster: the job finishes, every row exactly once.

Run: python -m pytest tests/test_cluster_faults.py -q -s      (-s shows the figures)

The cluster is three `ray start` nodes on this machine (tests/support/cluster.py): a head with
0 CPUs, where the driver attaches, and two worker nodes with 2 CPUs each, which run every task
and actor of the job. The driver is a process of its own (tests/support/cluster_driver.py), so
the test session's in-process Ray is never touched. A node is lost the way a preempted spot VM
is: every one of its processes (raylet, object store, agents, workers, actors) SIGKILLed at once,
mid-run, with model calls done and blocks in its object store.

- losing the node that holds the model actor: Ray restarts the actor on the surviving node, its
  batches are retried, lost blocks are rebuilt from lineage, and the driver keeps the first copy
  of each row;
- losing the node that holds a helper actor of the pipeline (the roster, which `run` keeps on
  the driver's node; placed on a worker node here on purpose): the pass goes on without it.
Both runs must finish with exit 0, rows in = rows out, no duplicate, all ok, and the lost node
counted dead by the cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline.output.layout import committed_shards, exists, read_output
from pipeline.storage import join
from tests.support.cluster import ROOT, LocalCluster
from tests.support.counting import calls, loads, pids
from tests.support.fault_jobs import make_job, photo_uris, put_manifest, seed_bucket

pytestmark = pytest.mark.slow

BUCKET = "cluster-runs"
ROWS = 24  # 6 shards of 4 rows, 6 model batches of 4
DELAY_S = 0.5  # per model call: the run lasts long enough to lose a node in the middle of it
KILL_AFTER_CALLS = 2


@pytest.fixture(scope="module")
def bucket(moto_endpoint, photo_dir):
    return seed_bucket(moto_endpoint, BUCKET, photo_dir)


@pytest.fixture(scope="module")
def cluster(moto_endpoint):
    """Head (0 CPUs) + worker nodes a and b (2 CPUs each), started after the S3 env is set, so
    every node's workers reach the same moto server."""
    with LocalCluster() as c:
        c.add_node("a", cpus=2)
        c.add_node("b", cpus=2)
        yield c


def _run_and_lose_a_node(cluster, job, tmp_path: Path, pick_victim, roster_on=None) -> dict:
    """Start the driver; once KILL_AFTER_CALLS model calls are done, kill the node
    `pick_victim(cluster, last_calling_pid)` names; wait for the driver; return its result."""
    job_file, log, result = tmp_path / "job.json", tmp_path / "calls.jsonl", tmp_path / "res.json"
    job_file.write_text(job.model_dump_json())
    cmd = [
        sys.executable, "-m", "tests.support.cluster_driver", "--address", cluster.address,
        "--job", str(job_file), "--calls", str(log), "--delay", str(DELAY_S),
        "--result", str(result),
    ] + (["--roster-on", roster_on] if roster_on else [])  # fmt: skip
    driver = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    victim, killed_at = None, None
    try:
        deadline = time.monotonic() + 120
        while victim is None and driver.poll() is None and time.monotonic() < deadline:
            done = calls(log)
            if len(done) >= KILL_AFTER_CALLS:
                victim = pick_victim(cluster, done[-1]["pid"])
                processes = cluster.kill(victim)
                killed_at = time.time()
            time.sleep(0.05)
        out, _ = driver.communicate(timeout=240)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert victim is not None, f"the job ended before a node was lost:\n{out[-3000:]}"
    assert driver.returncode == 0, f"the job failed after losing node {victim}:\n{out[-5000:]}"
    res = json.loads(result.read_text())
    res.update(victim=victim, processes_killed=processes, log=str(log))
    res["recovered_s"] = round(res["finished_at"] - killed_at, 1)
    return res


def _check_exactly_once(job, res: dict, ids: list[str]) -> None:
    out = read_output(job.output.uri, job.storage)
    got = out.column("id").to_pylist()
    duplicates = sum(n - 1 for n in Counter(got).values())
    summary = res["summary"]
    print(
        f"\nlost node {res['victim']} ({res['processes_killed']} processes SIGKILLed) after "
        f"{KILL_AFTER_CALLS} model calls; cluster counts {res['nodes_dead']} dead node(s); "
        f"rows in {summary['rows_in']} = rows out {summary['rows_out']} = output rows "
        f"{len(got)} / manifest {len(ids)}, {duplicates} duplicates, statuses "
        f"{summary['statuses']}; model loads {loads(res['log'])}, answering pids "
        f"{len(pids(res['log']))}; rosters on {[res['node_names'][n] for n in res['roster_nodes']]}"
        f"; finished {res['recovered_s']} s after the loss (job {res['wall_s']} s)"
    )
    assert sorted(got) == ids and duplicates == 0
    assert summary["rows_in"] == summary["rows_out"] == len(ids)
    assert summary["statuses"] == {"ok": len(ids)}
    assert Counter(out.column("status").to_pylist()) == {"ok": len(ids)}
    assert len(committed_shards(job.output.uri, job.storage)) == len(ids) // 4
    assert exists(join(job.output.uri, "_SUCCESS"), job.storage)


def _job(endpoint, bucket, tiny, photo_dir, name: str):
    photos = photo_uris(BUCKET, photo_dir)
    ids = [f"{name}{i:03d}" for i in range(ROWS)]
    images = [photos[i % len(photos)] for i in range(ROWS)]
    put_manifest(endpoint, BUCKET, f"m/{name}/part-0.parquet", ids, images)
    job = make_job(endpoint, bucket, tiny, f"m/{name}/", f"out/{name}")
    return job, ids


def test_lost_node_holding_the_model_actor(
    cluster, moto_endpoint, bucket, photo_dir, tiny_checkpoint, tmp_path
):
    job, ids = _job(moto_endpoint, bucket, tiny_checkpoint, photo_dir, "model")

    def model_actor_node(cluster, pid):
        node = cluster.node_of_pid(pid)
        assert node in ("a", "b"), f"pid {pid} answered but is on no worker node ({node})"
        return node

    res = _run_and_lose_a_node(cluster, job, tmp_path, model_actor_node)
    _check_exactly_once(job, res, ids)
    # The model was loaded again on the surviving node, by another process.
    assert loads(res["log"]) >= 2 and len(pids(res["log"])) >= 2
    # The roster ran where the driver runs, the head: losing a worker cannot touch it.
    assert res["driver_node"] == res["head_node"]
    assert set(res["roster_nodes"]) == {res["head_node"]}
    assert res["nodes_dead"] == 1


def test_lost_node_holding_a_helper_actor(
    cluster, moto_endpoint, bucket, photo_dir, tiny_checkpoint, tmp_path
):
    if cluster.nodes["a"].killed_at or cluster.nodes["b"].killed_at:
        cluster.add_node("c", cpus=2)  # replaces the node the test before lost
    alive = [n for n in cluster.nodes.values() if n.name != "head" and n.killed_at is None]
    helper = alive[-1].name
    job, ids = _job(moto_endpoint, bucket, tiny_checkpoint, photo_dir, "helper")
    res = _run_and_lose_a_node(cluster, job, tmp_path, lambda c, pid: helper, roster_on=helper)
    _check_exactly_once(job, res, ids)
    assert [res["node_names"][n] for n in res["roster_nodes"]] == [helper]
    assert res["nodes_dead"] == sum(n.killed_at is not None for n in cluster.nodes.values())
