"""Fault tests on real parts: a local Ray, moto S3 on 127.0.0.1 (behind a fault-injecting proxy
where the test says so), the tiny checkpoint and real photographs.

- an inference actor killed once in the middle of a run: every id exactly once, all ok;
- 10% of S3 requests answered 503 SlowDown and some connections reset, job-wide (manifest,
  model weights, images, commits, listings): nothing lost, and the faults really happened;
- every image missing: the failure-rate threshold aborts the job, and no success marker;
- a row that kills its worker on every retry: the job completes, that row alone fails.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import signal
import time
from collections import Counter

import pytest

from pipeline.builder import run
from pipeline.output.commit import JobAborted
from pipeline.output.layout import committed_shards, exists, read_output
from pipeline.runtime.weights import ModelLoader
from pipeline.storage import join
from tests.support import s3
from tests.support.counting import CountingLoader, answered_rows, loads, pids
from tests.support.fault_jobs import (
    POISON,
    make_job,
    photo_uris,
    put_manifest,
    seed_bucket,
)
from tests.support.faultproxy import FaultProxy, Faults

pytestmark = pytest.mark.slow

BUCKET = "fault-runs"


@pytest.fixture(scope="module")
def bucket(moto_endpoint, photo_dir):
    return seed_bucket(moto_endpoint, BUCKET, photo_dir)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging) when the block runs longer than `seconds`."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: the job hangs")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def wait_for_free_cpus(ray, cpus: float, timeout_s: float) -> bool:
    """Whether `cpus` CPUs of the local cluster are free within `timeout_s` (kills are async)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if ray.available_resources().get("CPU", 0) >= cpus:
            return True
        time.sleep(0.2)
    return False


def _photo_manifest(endpoint, photo_dir, key: str, n: int) -> list[str]:
    photos = photo_uris(BUCKET, photo_dir)
    ids = [f"r{i:03d}" for i in range(n)]
    put_manifest(endpoint, BUCKET, key, ids, [photos[i % len(photos)] for i in range(n)])
    return ids


def test_actor_killed_once_mid_run_every_id_once(
    ray_cluster, moto_endpoint, bucket, photo_dir, tiny_checkpoint, tmp_path
):
    ids = _photo_manifest(moto_endpoint, photo_dir, "m/crash/part-0.parquet", 20)
    job = make_job(moto_endpoint, bucket, tiny_checkpoint, "m/crash/", "out/crash")
    log, marker = tmp_path / "calls.jsonl", tmp_path / "crashed"
    loader = CountingLoader(ModelLoader(job), str(log), crash_on_call=3, crash_marker=str(marker))
    with deadline(150):
        summary = run(job, loader=loader)

    assert marker.exists(), "the actor never crashed: the test proved nothing"
    # Calls 1-2 came from the first actor process, the rest from its restarted successor.
    assert loads(log) == 2 and len(pids(log)) == 2
    assert answered_rows(log) >= 20
    out = read_output(job.output.uri, job.storage)
    assert sorted(out.column("id").to_pylist()) == ids  # each id once, none missing
    assert Counter(out.column("status").to_pylist()) == {"ok": 20}
    assert summary.rows_in == summary.rows_out == 20
    assert summary.statuses == {"ok": 20}
    assert summary.shards_committed == 5 and summary.filled_after_crash == []
    assert exists(join(job.output.uri, "_SUCCESS"), job.storage)


def test_s3_slowdowns_and_resets_job_wide_lose_nothing(
    ray_cluster, moto_endpoint, bucket, photo_dir, tiny_checkpoint, tmp_path
):
    ids = _photo_manifest(moto_endpoint, photo_dir, "m/flaky/part-0.parquet", 20)
    s3.upload_dir(moto_endpoint, tiny_checkpoint.visual_dir, BUCKET, "model/visual/")
    s3.upload_dir(moto_endpoint, tiny_checkpoint.llm_dir, BUCKET, "model/llm/")
    faults = Faults(slowdown=0.10, reset=0.03, reset_after=0.02)
    with FaultProxy(moto_endpoint, faults, seed=11) as proxy:
        job = make_job(
            proxy.url,
            bucket,
            tiny_checkpoint,
            "m/flaky/",
            "out/flaky",
            model={
                "visual": f"s3://{BUCKET}/model/visual",
                "llm": f"s3://{BUCKET}/model/llm",
                "cache_dir": str(tmp_path / "cache"),
            },
        )
        with deadline(150):
            summary = run(job)
        stats = proxy.stats()
        image_gets = proxy.count(method="GET", prefix=f"/{BUCKET}/images/")
        puts = proxy.count(method="PUT", prefix=f"/{BUCKET}/out/flaky/")

    # The faults really happened, on every kind of request the job makes.
    assert stats.slowdowns > 0 and stats.resets + stats.resets_after > 0, stats
    assert image_gets >= 20 and puts >= 2 * 5 + 2
    # ... and nothing was lost: read back straight from moto, not through the proxy.
    direct = make_job(moto_endpoint, bucket, tiny_checkpoint, "m/flaky/", "out/flaky")
    out = read_output(direct.output.uri, direct.storage)
    assert sorted(out.column("id").to_pylist()) == ids
    assert Counter(out.column("status").to_pylist()) == {"ok": 20}
    assert summary.rows_in == summary.rows_out == 20 and summary.statuses == {"ok": 20}
    assert len(committed_shards(direct.output.uri, direct.storage)) == 5
    assert exists(join(direct.output.uri, "_SUCCESS"), direct.storage)


def test_failing_everywhere_aborts_without_success_marker(
    ray_cluster, moto_endpoint, bucket, tiny_checkpoint, tmp_path
):
    n = 20
    ids = [f"m{i:03d}" for i in range(n)]
    put_manifest(
        moto_endpoint,
        BUCKET,
        "m/missing/part-0.parquet",
        ids,
        [f"s3://{BUCKET}/images/gone-{i}.jpg" for i in range(n)],
    )
    job = make_job(
        moto_endpoint,
        bucket,
        tiny_checkpoint,
        "m/missing/",
        "out/missing",
        run={"max_failure_rate": 0.5, "min_rows_before_abort": 4},
    )
    log = tmp_path / "calls.jsonl"
    with deadline(120), pytest.raises(JobAborted) as err:
        run(job, loader=CountingLoader(ModelLoader(job), str(log)))
    message = str(err.value)
    assert "> run.max_failure_rate 50%" in message, message
    assert "fetch_error" in message and "not found" in message and "gone-" in message
    assert answered_rows(log) == 0
    assert not exists(join(job.output.uri, "_SUCCESS"), job.storage)
    assert not exists(join(job.output.uri, "_summary.json"), job.storage)
    assert committed_shards(job.output.uri, job.storage) == set()


@contextlib.contextmanager
def records_kept(logger_name: str):
    """Keep every record logged under `logger_name`, tracebacks and all, as pytest's capture
    handler or a notebook does. Ray Data logs a dropped block's error with `exc_info`, whose
    frames reference the actor that ran it: a kept record used to keep that actor (and its CPU)
    alive after its pass, and the next pass waited for the CPU forever."""
    keeper = logging.handlers.BufferingHandler(capacity=1_000_000)
    logger = logging.getLogger(logger_name)
    logger.addHandler(keeper)
    try:
        yield keeper.buffer
    finally:
        logger.removeHandler(keeper)


def test_row_that_crashes_its_worker_every_time_does_not_hang(
    ray_cluster, moto_endpoint, bucket, photo_dir, tiny_checkpoint, tmp_path
):
    n, bad = 8, 5
    photos = photo_uris(BUCKET, photo_dir)
    ids = [f"p{i:03d}" for i in range(n)]
    images = [photos[i % len(photos)] for i in range(n)]
    images[bad] = f"s3://{BUCKET}/images/{POISON}"
    put_manifest(moto_endpoint, BUCKET, "m/poison/part-0.parquet", ids, images)
    job = make_job(
        moto_endpoint,
        bucket,
        tiny_checkpoint,
        "m/poison/",
        "out/poison",
        run={"max_task_retries": 1},
    )
    log = tmp_path / "calls.jsonl"
    # The logger that reports dropped blocks (Ray Data resets the handlers of "ray.data" itself).
    executor_log = "ray.data._internal.execution.streaming_executor_state"
    with deadline(240), records_kept(executor_log) as kept:
        summary = run(job, loader=CountingLoader(ModelLoader(job), str(log), poison=True))
        # Ray Data's executor, and so its log of the dropped block, is in the feeder lane now
        # (runtime/feeder.py), which runs both passes: a record there that kept the first
        # pass's actor would hold its CPU, and the second pass would wait (the deadline).
        # The driver logs no dropped block any more, so a kept record here references nothing.
        assert not any(r.exc_info for r in kept)
        # The pass's model actors are gone.
        assert wait_for_free_cpus(ray_cluster, 2, timeout_s=30)

    # Each pass (the stream, then the lost rows one per batch) crashed its worker on the first
    # try and on the one retry: at least four model loads.
    assert loads(log) >= 4
    out = {r["id"]: r for r in read_output(job.output.uri, job.storage).to_pylist()}
    assert sorted(out) == ids
    assert out[ids[bad]]["status"] == "inference_error"
    assert "crash" in out[ids[bad]]["error"]
    assert Counter(r["status"] for r in out.values()) == {"ok": n - 1, "inference_error": 1}
    assert summary.statuses == {"ok": n - 1, "inference_error": 1}
    assert exists(join(job.output.uri, "_SUCCESS"), job.storage)
