"""Feeder lanes (pipeline/runtime/feeder.py) on a real local Ray: Ray Data runs in them, not in
the driver, and the driver gets the reports gathered.

- two lanes, two model actors: every row once, both actors answered, the summary says 2 lanes;
  the next run of the process takes the same lanes, one of them with nothing to do;
- a lane's reports come gathered (fewer messages than blocks), every row once;
- closing the lanes ends what their executors still run: the CPUs come back at once;
- resources.feeders is checked against resources.actors before any work.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from pipeline.builder import run
from pipeline.config import ResourcesConfig
from pipeline.output.layout import exists, read_output
from pipeline.runtime import feeder
from pipeline.runtime.feeder import FLUSH_S, Feeders
from pipeline.runtime.weights import ModelLoader
from pipeline.storage import join
from tests.support.counting import CountingLoader, answered_rows, pids
from tests.support.fault_jobs import make_job, photo_uris, put_manifest, seed_bucket

BUCKET = "feeder-runs"
# Half a CPU per model actor: the 2-CPU test cluster keeps one for the block tasks (4 rows each,
# make_job's preprocess_batch_size).
TWO_LANES = {"actors": 2, "feeders": 2, "cpus_per_actor": 0.5, "preprocess_cpus": 0.5}


@pytest.fixture(scope="module")
def bucket(moto_endpoint, photo_dir):
    return seed_bucket(moto_endpoint, BUCKET, photo_dir)


def test_lanes_need_an_actor_each_and_default_to_one_per_32():
    assert ResourcesConfig().lanes == 1
    assert ResourcesConfig(actors=32).lanes == 1 and ResourcesConfig(actors=33).lanes == 2
    assert ResourcesConfig(actors=4, feeders=3).lanes == 3
    with pytest.raises(ValueError, match="each lane needs a model actor"):
        ResourcesConfig(actors=1, feeders=2)


@pytest.mark.slow
def test_two_lanes_answer_every_row_once(
    ray_cluster, moto_endpoint, bucket, photo_dir, tiny_checkpoint, tmp_path
):
    n = 24
    photos = photo_uris(BUCKET, photo_dir)
    ids = [f"l{i:03d}" for i in range(n)]
    put_manifest(
        moto_endpoint,
        BUCKET,
        "m/lanes/part-0.parquet",
        ids,
        [photos[i % len(photos)] for i in range(n)],
    )
    job = make_job(
        moto_endpoint,
        bucket,
        tiny_checkpoint,
        "m/lanes/",
        "out/lanes",
        resources=TWO_LANES,
    )
    log = tmp_path / "calls.jsonl"
    summary = run(job, loader=CountingLoader(ModelLoader(job), str(log)))

    assert summary.scheduling["lanes"] == 2 and summary.scheduling["cpu_s"] > 0
    assert len(pids(log)) == 2, "both lanes' model actors should have answered"
    assert answered_rows(log) >= n
    out = read_output(job.output.uri, job.storage)
    assert sorted(out.column("id").to_pylist()) == ids  # each id once, none missing
    assert Counter(out.column("status").to_pylist()) == {"ok": n}
    assert summary.rows_in == summary.rows_out == n and summary.shards_committed == n // 4
    assert exists(join(job.output.uri, "_SUCCESS"), job.storage)
    job_id = ray_cluster.get_runtime_context().get_job_id()
    lanes = {actor._actor_id for actor in feeder._IDLE[job_id]}
    assert len(lanes) == 2, "a run that ended normally leaves its lanes idle for the next"

    # One block for two lanes: the lane with nothing to do ends at once, the other does it all.
    put_manifest(moto_endpoint, BUCKET, "m/one/part-0.parquet", ids[:4], [photos[0]] * 4)
    one = make_job(
        moto_endpoint,
        bucket,
        tiny_checkpoint,
        "m/one/",
        "out/one",
        resources=TWO_LANES,
    )
    summary = run(one)
    assert summary.statuses == {"ok": 4} and summary.scheduling["lanes"] == 2
    again = {actor._actor_id for actor in feeder._IDLE[job_id]}
    assert again == lanes, "the second run took the same lanes"
    assert sorted(read_output(one.output.uri, one.storage).column("id").to_pylist()) == ids[:4]


def _ready_blocks(lane: int, lanes: int):
    """50 one-row-per-id blocks already in the object store: they reach the lane at once."""
    import ray

    return ray.data.range(200, override_num_blocks=50).materialize()


def _slow_blocks(lane: int, lanes: int):
    """A plan that runs for minutes: one CPU task per block, each sleeping 120 s."""
    import ray

    def slow(batch):
        time.sleep(120)
        return batch

    return ray.data.range(8, override_num_blocks=8).map_batches(slow, num_cpus=1)


@pytest.mark.slow
def test_a_lane_sends_its_reports_gathered(ray_cluster):
    feeders = Feeders.start(1)
    try:
        t0 = time.monotonic()
        sent = list(feeders.feed(_ready_blocks, max_crashed=0))
        took = time.monotonic() - t0
    finally:
        feeders.close()
    ids = [i for table in sent for i in table.column("id").to_pylist()]
    assert sorted(ids) == list(range(200))  # every row once
    # 50 blocks; a message per FLUSH_S at most while they stream in (plus the last one).
    assert len(sent) <= took / FLUSH_S + 1 and len(sent) < 50, (len(sent), took)


@pytest.mark.slow
def test_closing_the_lanes_ends_their_work_at_once(ray_cluster):
    import ray

    total = ray.cluster_resources()["CPU"]
    feeders = Feeders.start(1)
    actor = feeders.actors[0]
    context = ray.data.DataContext.get_current()
    stream = actor.feed.options(num_returns="streaming").remote(_slow_blocks, 0, 1, 0, context)
    end = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) > 0 and time.monotonic() < end:
        time.sleep(0.2)  # until the plan's tasks hold every CPU, each for two minutes
    assert ray.available_resources().get("CPU", 0) == 0, "the plan never started"
    feeders.close()
    end = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < end:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == total, "the lane's tasks outlived it"
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.cpu_s.remote(), timeout=30)
    del stream
