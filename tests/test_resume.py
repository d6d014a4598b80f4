"""Resume, rerun, retry_failed and incremental runs, counted at the model (real local Ray, moto S3
on 127.0.0.1, the tiny checkpoint, real photographs).

- the driver (`python -m jobs.cli run`) SIGKILLed at about half of the shards, then rerun: only
  the missing shards reach the model, committed shards are untouched, no id twice;
- a finished job rerun: no model call, no new object, no timestamp changed;
- retry_failed: only the failed rows reach the model and are replaced in place;
- incremental: a prompt change relabels everything; new rows (a new file, and rows inserted
  into a rewritten file) are the only ones labeled; `read_output` keeps the newest answer;
- an output holding shards of another plan (rows_per_shard changed) is refused before any model
  work, and overwrite mode replaces it without leaving the old shards beside the new ones.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from pipeline.builder import run
from pipeline.output.layout import commit_shard, committed_shards, exists, read_output, read_stats
from pipeline.planning.manifest import ManifestError, shard_id
from pipeline.runtime.weights import ModelLoader
from pipeline.storage import join
from tests.support import s3
from tests.support.counting import CountingLoader, answered_rows, loads
from tests.support.fault_jobs import listing, make_job, photo_uris, put_manifest, seed_bucket
from tests.support.faultproxy import FaultProxy, Faults

pytestmark = pytest.mark.slow

BUCKET = "resume-runs"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bucket(moto_endpoint, photo_dir):
    return seed_bucket(moto_endpoint, BUCKET, photo_dir)


def _images(photo_dir, n: int) -> list[str]:
    photos = photo_uris(BUCKET, photo_dir)
    return [photos[i % len(photos)] for i in range(n)]


def _counting(job, tmp_path: Path, name: str) -> tuple[CountingLoader, Path]:
    log = tmp_path / f"{name}.jsonl"
    return CountingLoader(ModelLoader(job), str(log)), log


def _wait(predicate, timeout: float, what: str, interval: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_driver_killed_midway_then_rerun_does_only_the_rest(
    ray_cluster, moto_endpoint, bucket, photo_dir, tiny_checkpoint, tmp_path
):
    n, per_shard = 16, 2
    shards_total = n // per_shard
    ids = [f"k{i:03d}" for i in range(n)]
    put_manifest(moto_endpoint, BUCKET, "m/killed/part-0.parquet", ids, _images(photo_dir, n))
    job = make_job(
        moto_endpoint,
        bucket,
        tiny_checkpoint,
        "m/killed/",
        "out/killed",
        rows_per_shard=per_shard,
        resources={"batch_size": 2, "preprocess_batch_size": 2},
    )
    out, prefix = job.output.uri, "out/killed/"
    # The killed run reads its images through a proxy that delays each image GET, so the run
    # lasts long enough to be killed in the middle; the proxy changes nothing else.
    slow = Faults(delay=1.0, delay_s=0.3, methods={"GET"}, path_prefix=f"/{BUCKET}/images/")
    with FaultProxy(moto_endpoint, slow, seed=3) as proxy:
        data = job.model_dump(mode="json")
        data["storage"]["endpoint_url"] = proxy.url
        job_file = tmp_path / "job.yaml"
        job_file.write_text(yaml.safe_dump(data))
        env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
        with open(tmp_path / "driver.log", "wb") as driver_log:
            driver = subprocess.Popen(
                [sys.executable, "-m", "jobs.cli", "run", str(job_file)],
                cwd=REPO,
                env=env,
                stdout=driver_log,
                stderr=subprocess.STDOUT,
            )
            try:

                def half_done():
                    if driver.poll() is not None:
                        log = (tmp_path / "driver.log").read_text(errors="replace")[-3000:]
                        raise AssertionError(f"the driver exited ({driver.returncode}):\n{log}")
                    return len(committed_shards(out, job.storage)) >= shards_total // 2

                _wait(half_done, 180, "half of the shards to be committed", interval=0.05)
                driver.send_signal(signal.SIGKILL)
            finally:
                if driver.poll() is None:
                    driver.kill()
                driver.wait(30)
    assert driver.returncode == -signal.SIGKILL
    # The dead driver's actors and workers are reaped: all CPUs are free again.
    total = ray_cluster.cluster_resources()["CPU"]
    _wait(lambda: ray_cluster.available_resources().get("CPU") == total, 60, "Ray to reap it")

    committed = committed_shards(out, job.storage)
    assert shards_total // 2 <= len(committed) < shards_total
    assert not exists(join(out, "_SUCCESS"), job.storage)
    before = listing(moto_endpoint, BUCKET, prefix)
    kept = {k: v for k, v in before.items() if any(f"/{sid}." in k for sid in committed)}
    assert len(kept) == 2 * len(committed)  # a .parquet and a _stats/ file each

    loader, log = _counting(job, tmp_path, "rerun")
    summary = run(job, loader=loader)
    missing = shards_total - len(committed)
    assert answered_rows(log) == per_shard * missing  # only the missing shards' rows
    assert summary.rows_in == per_shard * missing
    assert summary.shards_skipped == len(committed) and summary.shards_committed == missing
    after = listing(moto_endpoint, BUCKET, prefix)
    assert {k: after[k] for k in kept} == kept  # committed shards untouched
    result = read_output(out, job.storage)
    assert sorted(result.column("id").to_pylist()) == ids
    assert Counter(result.column("status").to_pylist()) == {"ok": n}
    assert exists(join(out, "_SUCCESS"), job.storage)

    # A finished job rerun: no model (not even loaded), no new object, nothing rewritten.
    loader, log = _counting(job, tmp_path, "finished")
    again = run(job, loader=loader)
    assert loads(log) == 0 and answered_rows(log) == 0
    assert again.rows_in == 0 and again.shards_skipped == shards_total
    assert listing(moto_endpoint, BUCKET, prefix) == after


def test_retry_failed_redoes_only_failed_rows_in_place(
    ray_cluster, moto_endpoint, bucket, photo_dir, tiny_checkpoint, tmp_path
):
    n, late = 16, (1, 5, 6)  # rows whose images are uploaded only after the first run
    ids = [f"f{i:03d}" for i in range(n)]
    images = _images(photo_dir, n)
    for i in late:
        images[i] = f"s3://{BUCKET}/late/img-{i}.jpg"
    put_manifest(moto_endpoint, BUCKET, "m/retry/part-0.parquet", ids, images)
    job = make_job(moto_endpoint, bucket, tiny_checkpoint, "m/retry/", "out/retry")
    out = job.output.uri
    first = run(job)
    assert first.statuses == {"ok": n - len(late), "fetch_error": len(late)}
    before_rows = {r["id"]: r for r in read_output(out, job.storage).to_pylist()}
    assert {i for i, r in before_rows.items() if r["status"] != "ok"} == {ids[i] for i in late}
    # Shards: rows 0-3 (one late), 4-7 (two late), 8-11 (none), 12-15 (none). The last one is
    # made uncommitted, as a crash before its data file was written would leave it.
    shard_ids = sorted(committed_shards(out, job.storage))
    assert len(shard_ids) == 4
    fs = s3.s3fs_filesystem(moto_endpoint)
    fs.rm_file(f"{BUCKET}/out/retry/shards/{shard_ids[3]}.parquet")
    fs.rm_file(f"{BUCKET}/out/retry/_SUCCESS")

    photos = sorted(photo_dir.glob("*.jpg"))
    for i in late:
        s3.upload_file(moto_endpoint, photos[i % len(photos)], BUCKET, f"late/img-{i}.jpg")
    before = listing(moto_endpoint, BUCKET, "out/retry/")
    retry = make_job(
        moto_endpoint,
        bucket,
        tiny_checkpoint,
        "m/retry/",
        "out/retry",
        run={"mode": "retry_failed"},
    )
    loader, log = _counting(retry, tmp_path, "retry")
    summary = run(retry, loader=loader)
    redo = len(late) + 4  # the failed rows and the uncommitted shard, nothing else
    assert answered_rows(log) == redo
    assert summary.rows_in == redo and summary.statuses == {"ok": redo}
    assert summary.shards_committed == 3 and summary.shards_skipped == 1

    rows = read_output(out, job.storage).to_pylist()
    assert sorted(r["id"] for r in rows) == ids  # still exactly one row per input row
    assert Counter(r["status"] for r in rows) == {"ok": n}
    for r in rows:
        if r["id"] in ids[:12] and r["id"] not in {ids[i] for i in late}:
            assert r == before_rows[r["id"]]  # rows that were ok are kept as they were
    # Stats of the rewritten shards now count only ok rows; the third shard is untouched.
    stats = read_stats(out, shard_ids, job.storage)
    assert [s["statuses"] for s in stats.values()] == [{"ok": 4}] * 4
    assert [(s["rows"], s["input_rows"]) for s in stats.values()] == [(4, 4)] * 4
    after = listing(moto_endpoint, BUCKET, "out/retry/")
    untouched = [k for k in before if f"/{shard_ids[2]}." in k]
    assert len(untouched) == 2 and all(after[k] == before[k] for k in untouched)
    rewritten = [k for k in before if any(f"/{shard_ids[i]}." in k for i in (0, 1, 3))]
    assert len(rewritten) == 5 and all(after[k] != before[k] for k in rewritten)
    assert exists(join(out, "_SUCCESS"), job.storage)

    # Nothing failed any more: another retry_failed run has nothing to do.
    loader, log = _counting(retry, tmp_path, "again")
    assert run(retry, loader=loader).rows_in == 0
    assert loads(log) == 0 and listing(moto_endpoint, BUCKET, "out/retry/") == after


def test_incremental_relabels_on_prompt_change_and_labels_only_new_rows(
    ray_cluster, moto_endpoint, bucket, photo_dir, tiny_checkpoint, tmp_path
):
    n = 20
    ids = [f"i{i:03d}" for i in range(n)]
    images = _images(photo_dir, n)
    put_manifest(moto_endpoint, BUCKET, "m/inc/part-0.parquet", ids, images)

    def job_for(prompt: str):
        return make_job(
            moto_endpoint,
            bucket,
            tiny_checkpoint,
            "m/inc/",
            "out/inc",
            rows_per_shard=5,
            task={"caption_prompt": prompt},
            run={"mode": "incremental"},
        )

    def labeled(job, name: str) -> int:
        loader, log = _counting(job, tmp_path, name)
        run(job, loader=loader)
        return answered_rows(log)

    old, new = job_for("What is in the picture?"), job_for("Describe the picture briefly.")
    assert labeled(old, "first") == n
    assert labeled(new, "prompt-changed") == n  # a new prompt relabels every row
    out = read_output(new.output.uri, new.storage)
    assert sorted(out.column("id").to_pylist()) == ids
    assert set(out.column("question").to_pylist()) == {"Describe the picture briefly."}
    assert labeled(new, "unchanged") == 0  # same manifests, same job: nothing to do

    # The manifest grows by 20%: a new file with 2 rows, and the old file rewritten with 2 rows
    # inserted in the middle (the old rows keep their ids, not their positions).
    added = ["n000", "n001"]
    put_manifest(moto_endpoint, BUCKET, "m/inc/part-1.parquet", added, images[:2])
    inserted = ["j000", "j001"]
    grown_ids = ids[:7] + inserted[:1] + ids[7:13] + inserted[1:] + ids[13:]
    grown_images = images[:7] + images[:1] + images[7:13] + images[1:2] + images[13:]
    put_manifest(moto_endpoint, BUCKET, "m/inc/part-0.parquet", grown_ids, grown_images)
    assert labeled(new, "grown") == len(added) + len(inserted)

    out = read_output(new.output.uri, new.storage)
    keys = Counter(
        zip(out.column("id").to_pylist(), out.column("question_index").to_pylist(), strict=True)
    )
    assert sorted(keys) == sorted((i, 0) for i in ids + added + inserted)
    assert set(keys.values()) == {1}  # exactly one row per (id, question_index)
    assert set(out.column("question").to_pylist()) == {"Describe the picture briefly."}
    assert Counter(out.column("status").to_pylist()) == {"ok": n + 4}


def test_output_of_another_plan_is_refused_then_overwritten(
    ray_cluster, moto_endpoint, bucket, photo_dir, tiny_checkpoint, tmp_path
):
    ids = [f"o{i:03d}" for i in range(4)]
    manifest = put_manifest(
        moto_endpoint, BUCKET, "m/plan/part-0.parquet", ids, _images(photo_dir, 4)
    )
    job = make_job(moto_endpoint, bucket, tiny_checkpoint, "m/plan/", "out/plan", rows_per_shard=2)
    # The output already holds a shard committed by a run with rows_per_shard=4.
    old = shard_id(manifest, 0, 4)
    rows = pa.table({"id": ids, "image": _images(photo_dir, 4), "status": ["ok"] * 4})
    commit_shard(job.output.uri, old, rows, {"shard": old, "rows": 4}, job.storage)
    before = listing(moto_endpoint, BUCKET, "out/plan/")

    loader, log = _counting(job, tmp_path, "refused")
    with pytest.raises(ManifestError, match=r"holds 1 committed shards .* e\.g\. part-0-"):
        run(job, loader=loader)
    assert loads(log) == 0 and listing(moto_endpoint, BUCKET, "out/plan/") == before

    overwrite = make_job(
        moto_endpoint,
        bucket,
        tiny_checkpoint,
        "m/plan/",
        "out/plan",
        rows_per_shard=2,
        run={"mode": "overwrite"},
    )
    loader, log = _counting(overwrite, tmp_path, "overwrite")
    summary = run(overwrite, loader=loader)
    assert answered_rows(log) == 4 and summary.shards_committed == 2
    assert not [k for k in listing(moto_endpoint, BUCKET, "out/plan/") if old in k]
    out = read_output(job.output.uri, job.storage)
    assert sorted(out.column("id").to_pylist()) == ids  # no duplicate from the old shard
    assert Counter(out.column("status").to_pylist()) == {"ok": 4}
