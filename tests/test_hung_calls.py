"""A model call that hangs never stalls a job: its actor is ended and the batch retried like a
crash, so the row that hangs every time ends as the only `inference_error`.

Run: python -m pytest tests/test_hung_calls.py -q -s      (-s shows the figures)

The watchdog alone (no Ray), then a whole job on the session's local Ray with moto S3 and the
tiny checkpoint, whose model hangs forever when it encodes the uniform `poison.jpg` row
(`CountingLoader(hang=True)`: a stuck kernel, which nothing in the process can interrupt).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import Counter

import pytest

from pipeline.builder import run
from pipeline.output.layout import exists, read_output
from pipeline.runtime.watchdog import HUNG_EXIT_CODE, CallWatchdog
from pipeline.runtime.weights import ModelLoader
from pipeline.storage import join
from tests.support.counting import CountingLoader, events, loads
from tests.support.fault_jobs import POISON, make_job, photo_uris, put_manifest, seed_bucket

BUCKET = "hung-runs"


def test_watchdog_ends_only_a_call_past_the_limit():
    exits: list[int] = []
    ended = threading.Event()

    def fake_exit(code: int) -> None:
        exits.append(code)
        ended.set()

    watchdog = CallWatchdog(0.5, exit=fake_exit)
    with watchdog.guard("answer_batch(4 prompts)"):
        time.sleep(0.2)  # well inside the limit
    time.sleep(0.6)
    assert exits == [] and watchdog.fired is None

    t0 = time.monotonic()
    with watchdog.guard("encode_images(4 images)"):
        assert ended.wait(5), "a call past the limit was never ended"
    waited = time.monotonic() - t0
    assert exits == [HUNG_EXIT_CODE]
    assert 0.5 < waited < 2.0, waited  # a tick (0.05 s here) past the limit, plus a busy machine
    assert "encode_images(4 images)" in watchdog.fired
    assert "run.batch_timeout_s 0.5 s" in watchdog.fired

    never = CallWatchdog(None, exit=fake_exit)
    with never.guard("generate"):
        time.sleep(0.1)
    assert never.fired is None and exits == [HUNG_EXIT_CODE]


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


@pytest.mark.slow
def test_row_that_hangs_its_model_call_ends_alone_as_inference_error(
    ray_cluster, moto_endpoint, photo_dir, tiny_checkpoint, tmp_path
):
    bucket = seed_bucket(moto_endpoint, BUCKET, photo_dir)
    n, bad, limit_s, retries = 8, 5, 3.0, 1
    photos = photo_uris(BUCKET, photo_dir)
    ids = [f"h{i:03d}" for i in range(n)]
    images = [photos[i % len(photos)] for i in range(n)]
    images[bad] = f"s3://{BUCKET}/images/{POISON}"
    put_manifest(moto_endpoint, BUCKET, "m/hang/part-0.parquet", ids, images)
    job = make_job(
        moto_endpoint,
        bucket,
        tiny_checkpoint,
        "m/hang/",
        "out/hang",
        run={"max_task_retries": retries, "batch_timeout_s": limit_s},
    )
    log = tmp_path / "calls.jsonl"
    t0 = time.time()
    with deadline(240):
        summary = run(job, loader=CountingLoader(ModelLoader(job), str(log), hang=True))
    wall = time.time() - t0

    hangs = [e["t"] for e in events(log, "hang")]
    load_times = [e["t"] for e in events(log, "load")]
    # Time to recover from a hang: the call ended at the limit, the actor restarted and loaded
    # its model again (after the last hang the pass may end first: no load follows it).
    recover = [min(t for t in load_times if t > h) - h for h in hangs if h < load_times[-1]]
    print(
        f"\n{len(hangs)} hung model calls (limit {limit_s:g} s), each ended and its actor "
        f"reloaded after {min(recover):.1f}-{max(recover):.1f} s; job finished "
        f"{t0 + wall - hangs[0]:.1f} s after the first hang, {wall:.1f} s in all; "
        f"model loads {loads(log)}; statuses {summary.statuses}"
    )
    # Each pass (the stream, then the lost rows one per batch) tried the hung batch once and
    # retried it max_task_retries times, exactly as for a crash.
    assert len(hangs) == 2 * (retries + 1)
    assert all(r > limit_s for r in recover), recover
    out = {r["id"]: r for r in read_output(job.output.uri, job.storage).to_pylist()}
    assert sorted(out) == ids
    assert out[ids[bad]]["status"] == "inference_error"
    assert "run.batch_timeout_s" in out[ids[bad]]["error"]
    assert Counter(r["status"] for r in out.values()) == {"ok": n - 1, "inference_error": 1}
    assert summary.rows_in == summary.rows_out == n
    assert summary.statuses == {"ok": n - 1, "inference_error": 1}
    assert exists(join(job.output.uri, "_SUCCESS"), job.storage)
