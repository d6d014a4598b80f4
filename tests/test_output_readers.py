"""An output every Parquet reader opens: pyarrow, pandas and Ray Data pointed at OUT itself.

    python -m pytest tests/test_output_readers.py -q

- a real run of the pipeline (tiny model, local Ray, images listed from a directory so the run
  writes its manifest under OUT/_input/) whose driver is SIGKILLed mid-run, leaving rows staged
  under OUT/_staging/ and shards uncommitted; readers of that state see only the committed
  rows; after the resume `pyarrow.dataset`, `pyarrow.parquet.read_table`, `pandas.read_parquet`
  and `ray.data.read_parquet` each read exactly input rows x questions, no (id, question_index)
  twice, with a killed run's staging put back beside them (as a run in flight has it), also on
  moto S3 through s3fs;
- an incremental output (two runs under OUT/runs/) merged by `ziya-batch merge` into a plain
  dataset that the same readers open, one row per key (OUT itself holds both runs' rows);
- `merge` on hand-written layouts (no Ray): newest answer per key, plain outputs copied,
  refused destinations;
- ARCHITECTURE.md's output-column table is `pipeline.columns.OUTPUT_FIELDS`, in order.

Ray Data 2.60's `read_parquet` skips names starting with `_` or `.` only at the top level of
the directory it is given (OUT/_staging/, OUT/_input/, OUT/_stats/), not deeper: it reads
OUT/shards/.<name>.parquet and OUT/runs/<run_id>/_staging/ (pyarrow and pandas skip those at
any depth). The pipeline's own files deeper down end in `.tmp` or `.json`, which Ray's default
`.parquet` extension filter leaves out; a killed incremental run's staging is read by Ray Data
pointed at OUT, which is why incremental outputs are read through `ziya-batch merge`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.columns import OUTPUT_FIELDS
from pipeline.config import StorageConfig
from pipeline.output import layout
from pipeline.output.merge import MergeError, merge
from tests.support.run_layout import write_layout

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is in the picture?", "Which colour dominates?"]
COLUMNS = ["id", "question_index", "question", "status"]


def _job(images: Path, out: Path, tiny, questions=QUESTIONS, **sections):
    from pipeline.config import parse_job

    data = {
        "name": "readers",
        "input": {"images": str(images)},
        "output": {"uri": str(out), "rows_per_shard": 4},
        "task": {"kind": "vqa", "questions": list(questions)},
        "model": {"visual": str(tiny.visual_dir), "llm": str(tiny.llm_dir)},
        "generation": {"max_new_tokens": 4},
        "resources": {"actors": 1, "batch_size": 2, "preprocess_batch_size": 2},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_job(data)


def _photos(folder: Path, photo_dir: Path, names: list[str]) -> list[str]:
    """One JPEG per name (the real photographs, in turn); returns the ids a listing gives."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(photo_dir.glob("*.jpg"))
    for i, name in enumerate(names):
        shutil.copy(photos[i % len(photos)], folder / f"{name}.jpg")
    return [f"{name}.jpg" for name in names]


def _readers(path: str, storage_options: dict | None = None) -> dict[str, pa.Table]:
    """What each reader reads at `path` (a local directory, or s3:// with storage_options)."""
    import pandas as pd
    import ray.data

    if storage_options is not None:
        from tests.support.s3 import s3fs_filesystem

        fs = s3fs_filesystem(storage_options["client_kwargs"]["endpoint_url"])
        bare = path.removeprefix("s3://")
        return {
            "pyarrow.dataset": pads.dataset(bare, format="parquet", filesystem=fs).to_table(
                columns=COLUMNS
            ),
            "pandas": pa.Table.from_pandas(
                pd.read_parquet(path, columns=COLUMNS, storage_options=storage_options),
                preserve_index=False,
            ),
        }
    return {
        "pyarrow.dataset": pads.dataset(path, format="parquet").to_table(columns=COLUMNS),
        "pyarrow.parquet": pq.read_table(path, columns=COLUMNS),
        "pandas": pa.Table.from_pandas(
            pd.read_parquet(path, columns=COLUMNS), preserve_index=False
        ),
        "ray.data": pa.Table.from_pylist(
            ray.data.read_parquet(path).select_columns(COLUMNS).take_all()
        ),
    }


def _check(tables: dict[str, pa.Table], ids: list[str], questions: list[str]) -> None:
    for reader, t in tables.items():
        keys = Counter(
            zip(t.column("id").to_pylist(), t.column("question_index").to_pylist(), strict=True)
        )
        assert t.num_rows == len(ids) * len(questions), reader
        assert max(keys.values()) == 1, f"{reader}: duplicate (id, question_index)"
        assert sorted(keys) == sorted((i, q) for i in ids for q in range(len(questions))), reader
        assert set(t.column("question").to_pylist()) == set(questions), reader


def _wait(predicate, timeout: float, what: str, interval: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _staged(out: Path) -> list[Path]:
    return sorted((out / layout.STAGING_DIR).rglob("*.parquet"))


@pytest.mark.slow
def test_killed_and_resumed_run_is_read_once_by_every_reader(
    ray_cluster, moto_endpoint, tiny_checkpoint, photo_dir, tmp_path
):
    from pipeline.builder import run
    from tests.support import s3

    images, out = tmp_path / "images", tmp_path / "out"
    ids = _photos(images, photo_dir, [f"p{i:02d}" for i in range(16)])
    job = _job(images, out, tiny_checkpoint)
    shards_total = len(ids) // 4
    job_file = tmp_path / "job.json"
    job_file.write_text(job.model_dump_json())
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "tests.support.cluster_driver",
           "--address", env["RAY_ADDRESS"], "--job", str(job_file),
           "--calls", str(tmp_path / "calls.jsonl"), "--delay", "0.4",
           "--result", str(tmp_path / "result.json")]  # fmt: skip
    with open(tmp_path / "driver.log", "wb") as driver_log:
        driver = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=driver_log, stderr=subprocess.STDOUT
        )
        try:

            def mid_run() -> bool:
                if driver.poll() is not None:
                    log = (tmp_path / "driver.log").read_text(errors="replace")[-3000:]
                    raise AssertionError(f"the driver exited ({driver.returncode}):\n{log}")
                done = len(layout.committed_shards(str(out), job.storage))
                return 1 <= done < shards_total and bool(_staged(out))

            _wait(mid_run, 240, "a committed shard and staged rows of another")
            driver.send_signal(signal.SIGKILL)
        finally:
            if driver.poll() is None:
                driver.kill()
            driver.wait(30)
    assert driver.returncode == -signal.SIGKILL
    total = ray_cluster.cluster_resources()["CPU"]
    _wait(lambda: ray_cluster.available_resources().get("CPU") == total, 60, "Ray to reap it")

    # What the kill left: staged rows, uncommitted shards, the run's own manifest, no _SUCCESS.
    staged = _staged(out)
    committed = layout.committed_shards(str(out), job.storage)
    assert staged and 1 <= len(committed) < shards_total
    assert {p.parent.name for p in staged} - committed, "rows staged for an uncommitted shard"
    assert sorted((out / "_input").rglob("*.parquet")), "the listing's manifest under _input/"
    assert not (out / layout.SUCCESS).exists()
    left = tmp_path / "left-by-the-kill"
    shutil.copytree(out / layout.STAGING_DIR, left)
    # Readers of the killed output see the committed rows only, once.
    partial = pads.dataset(str(out), format="parquet").to_table(columns=COLUMNS)
    assert partial.num_rows == 4 * len(QUESTIONS) * len(committed)
    assert set(partial.column("id").to_pylist()) < set(ids)

    summary = run(job)
    assert summary.shards_skipped == len(committed)
    assert (out / layout.SUCCESS).exists() and not _staged(out)
    # Staging beside the committed output, as a run in flight (or killed again) leaves it.
    shutil.copytree(left, out / layout.STAGING_DIR)
    assert _staged(out)
    _check(_readers(str(out)), ids, QUESTIONS)
    assert layout.read_output(str(out)).num_rows == len(ids) * len(QUESTIONS)

    # The same output on S3 (moto), read through s3fs.
    s3.create_bucket(moto_endpoint, "readers")
    s3.upload_dir(moto_endpoint, out, "readers", "out/")
    assert any(k.startswith("out/_staging/") for k in s3.list_keys(moto_endpoint, "readers"))
    options = {"client_kwargs": {"endpoint_url": moto_endpoint, "region_name": s3.REGION}}
    _check(_readers("s3://readers/out/", options), ids, QUESTIONS)


@pytest.mark.slow
def test_incremental_output_merged_is_read_once_by_every_reader(
    ray_cluster, tiny_checkpoint, photo_dir, tmp_path
):
    from jobs.cli import main
    from pipeline.builder import run

    images, out, dest = tmp_path / "images", tmp_path / "out", tmp_path / "merged"
    first = _photos(images, photo_dir, [f"a{i:02d}" for i in range(8)])
    run(_job(images, out, tiny_checkpoint, run={"mode": "incremental"}))
    # New images, and new questions: the second run labels every row again (8 + 4).
    later = _photos(images, photo_dir, [f"b{i:02d}" for i in range(4)])
    new_questions = ["Where was it taken?", "How many people are there?"]
    run(_job(images, out, tiny_checkpoint, new_questions, run={"mode": "incremental"}))
    runs = layout.list_runs(str(out), StorageConfig())
    assert len(runs) == 2
    # OUT itself holds both runs' rows: a reader of OUT sees the older answers too.
    union = pq.read_table(str(out), columns=COLUMNS)
    assert union.num_rows == (len(first) + len(first + later)) * 2

    assert main(["merge", str(out), str(dest), "--rows-per-file", "7"]) == 0
    assert (dest / layout.SUCCESS).exists()
    parts = sorted(dest.glob("part-*.parquet"))
    assert len(parts) == 6  # ceil(40 rows read / 7 per file), rows by a hash of their id
    info = json.loads((dest / "_merge.json").read_text())
    assert info["runs"] == runs and info["rows"] == 24 and info["rows_read"] == 40
    _check(_readers(str(dest)), first + later, new_questions)


# -- merge on hand-written layouts (no Ray) -------------------------------------------------------


def _relabel(path: Path, prefix: str) -> None:
    table = pq.read_table(path)
    answers = [None if a is None else f"{prefix}{a}" for a in table.column("answer").to_pylist()]
    i = table.column_names.index("answer")
    pq.write_table(table.set_column(i, "answer", pa.array(answers, pa.string())), path)


def test_merge_keeps_the_newest_answer_per_key(tmp_path: Path):
    out = tmp_path / "out"
    old = write_layout(out / "runs" / "r1", tmp_path / "i1", finished=False)
    new = write_layout(out / "runs" / "r2", tmp_path / "i2")
    (out / "runs" / "r1" / "_run.json").write_text(json.dumps({"started_at": 1.0}))
    (out / "runs" / "r2" / "_run.json").write_text(json.dumps({"started_at": 2.0}))
    (out / "runs" / "r2" / "shards" / f"{new.shard_ids[0]}.parquet").unlink()
    _relabel(out / "runs" / "r2" / "shards" / f"{new.shard_ids[1]}.parquet", "NEW ")
    result = merge(str(out), str(tmp_path / "dest"), rows_per_file=5)
    assert result.incremental and result.runs == ["r1", "r2"]
    assert result.rows_read == 36 and result.rows == 24 and len(result.files) == 8
    merged = pads.dataset(str(tmp_path / "dest"), format="parquet").to_table()
    by_id = {r["id"]: r for r in merged.to_pylist()}
    assert sorted(by_id) == sorted(r["id"] for r in old.rows) and merged.num_rows == 24
    for r in old.rows:
        want = r["answer"] if r["id"] < "img-012" or r["answer"] is None else "NEW " + r["answer"]
        assert by_id[r["id"]]["answer"] == want
    assert (
        merged.column_names
        == pq.read_table(
            out / "runs" / "r1" / "shards" / f"{old.shard_ids[0]}.parquet"
        ).column_names
    )
    assert result.warnings == []  # the latest run is finished


def test_merge_of_a_plain_output_copies_its_committed_shards(tmp_path: Path):
    out = write_layout(tmp_path / "out", tmp_path / "images")
    result = merge(str(out.out), str(tmp_path / "dest"))
    assert not result.incremental and result.rows == len(out.rows) == 24
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == sorted(
        [f"part-{s}.parquet" for s in out.shard_ids] + ["_SUCCESS", "_merge.json"]
    )
    assert pq.read_table(tmp_path / "dest").num_rows == 24


def test_merge_refuses_a_destination_inside_the_output_or_not_empty(tmp_path: Path):
    out = write_layout(tmp_path / "out", tmp_path / "images").out
    with pytest.raises(MergeError, match="inside the output"):
        merge(str(out), str(out / "merged"))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    with pytest.raises(MergeError, match="not empty"):
        merge(str(out), str(dest))
    assert merge(str(out), str(dest), overwrite=True).rows == 24
    assert not (dest / "keep.txt").exists()
    with pytest.raises(MergeError, match="nothing to merge"):
        merge(str(tmp_path / "nothing"), str(tmp_path / "d2"))


# -- the documented schema --------------------------------------------------------------------------


def test_architecture_output_column_table_is_output_fields():
    text = (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8")
    start = text.index("<!-- output-columns -->")
    end = text.index("<!-- /output-columns -->")
    rows = [line for line in text[start:end].splitlines() if line.startswith("| `")]
    names = [line.split("`")[1] for line in rows]
    assert names == [name for name, _, _ in OUTPUT_FIELDS]
    types = [line.split("|")[2].strip() for line in rows]
    assert types == [str(t) for _, t, _ in OUTPUT_FIELDS]
