"""Each stage called directly, without Ray: column contracts, statuses, and the commit path's
exactly-once bookkeeping."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.builder import default_policy
from pipeline.columns import StageInputError
from pipeline.config import JobConfigError, parse_job
from pipeline.output.commit import CommitSettings, CommitTracker, JobAborted
from pipeline.output.layout import committed_shards, read_output, staging_root
from pipeline.planning.manifest import ManifestError, plan
from pipeline.runtime.weights import ModelLoader
from pipeline.stages.fetch import FetchStage
from pipeline.stages.infer import InferStage
from pipeline.stages.preprocess import PreprocessStage
from pipeline.stages.read import ReadStage
from pipeline.stages.write import WriteStage


@pytest.fixture
def local_job(tmp_path, photo_dir, tiny_checkpoint):
    photos = sorted(photo_dir.glob("*.jpg"))[:3]
    (tmp_path / "bad.jpg").write_bytes(b"\x00" * 10)
    images = [str(p) for p in photos] + [str(tmp_path / "bad.jpg"), str(tmp_path / "nope.jpg")]
    table = pa.table(
        {
            "id": [f"i{k}" for k in range(len(images))],
            "image": images,
            "questions": [["q1?", "q2?"], ["only one"], ["\u200b\u200b", "fine?"], ["x"], ["y"]],
            "extra": [1.5, 2.5, 3.5, 4.5, 5.5],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")

    def make(**over):
        data = {
            "input": {"uri": str(tmp_path / "m.parquet")},
            "output": {"uri": str(tmp_path / "out"), "rows_per_shard": 2},
            "task": {"kind": "vqa"},
            "model": {
                "visual": str(tiny_checkpoint.visual_dir),
                "llm": str(tiny_checkpoint.llm_dir),
            },
            "generation": {"max_new_tokens": 4},
            "limits": {"allowed_locations": [str(photo_dir) + "/", str(tmp_path) + "/"]},
        }
        data.update(over)
        return parse_job(data)

    return make


def _shard_rows(job):
    p = plan(job)
    return p, pa.Table.from_pylist(
        [{"shard_id": s.shard_id, "path": s.path, "start": s.start, "end": s.end} for s in p.shards]
    )


def test_stages_chain_without_ray(local_job):
    job = local_job()
    p, shards = _shard_rows(job)
    assert [s.num_rows for s in p.shards] == [2, 2, 1]
    rows = ReadStage.for_job(job)(shards)
    assert rows.num_rows == 5
    r2 = rows.to_pylist()[2]
    assert r2["questions"] == ["", "fine?"] and r2["question_errors"][0] is not None

    fetched = FetchStage.for_job(job, default_policy(job, p.files), "fp")(rows)
    statuses = fetched.column("status").to_pylist()
    assert statuses == ["ok", "ok", "ok", "ok", "fetch_error"]
    assert all(
        len(k) == len(q)
        for k, q in zip(
            fetched.column("row_keys").to_pylist(),
            rows.column("questions").to_pylist(),
            strict=True,
        )
    )

    pre = PreprocessStage(224, 10_000_000)(fetched)
    assert "image_bytes" not in pre.column_names
    assert pre.column("status").to_pylist() == ["ok", "ok", "ok", "decode_error", "fetch_error"]
    assert len(pre.column("pixels")[0].as_py()) == 3 * 224 * 224  # uint8: a quarter of float32

    infer = InferStage(
        ModelLoader(job), __import__("ziya_model").GenerationSettings(max_new_tokens=4), 4
    )
    out = infer(pre)
    got = [(r["id"], r["question_index"], r["status"]) for r in out.to_pylist()]
    assert got == [
        ("i0", 0, "ok"),
        ("i0", 1, "ok"),
        ("i1", 0, "ok"),
        ("i2", 0, "invalid_question"),
        ("i2", 1, "ok"),
        ("i3", 0, "decode_error"),
        ("i4", 0, "fetch_error"),
    ]
    assert all((r["answer"] is not None) == (r["status"] == "ok") for r in out.to_pylist())


def test_stage_names_itself_when_columns_are_missing(local_job):
    job = local_job()
    with pytest.raises(StageInputError, match=r"PreprocessStage needs columns \['image_bytes'"):
        PreprocessStage(224, 100)(pa.table({"status": ["ok"], "error": [None]}))
    with pytest.raises(StageInputError, match="FetchStage"):
        FetchStage.for_job(job, default_policy(job, []), "fp")(pa.table({"id": ["a"]}))


def _answers(shard, rows, status="ok"):
    return pa.table(
        {
            "shard": [shard.shard_id] * len(rows),
            "row": pa.array(rows, pa.int64()),
            "id": [f"i{r}" for r in rows],
            "question_index": pa.array([0] * len(rows), pa.int32()),
            "question": ["q"] * len(rows),
            "answer": ["a"] * len(rows),
            "status": [status] * len(rows),
            "error": [None if status == "ok" else "boom"] * len(rows),
            "num_tokens": pa.array([3] * len(rows), pa.int32()),
            "mean_logprob": pa.array([-0.5] * len(rows), pa.float32()),
            "latency_s": pa.array([0.1] * len(rows), pa.float32()),
            "row_key": ["k"] * len(rows),
            "image_identity": ["e"] * len(rows),
        }
    )


def _tracker(job, p) -> tuple[CommitTracker, WriteStage]:
    """The commit path without Ray: the write stage stages real files, the tracker commits in
    process (the pipeline runs the same `commit_shard` as remote tasks)."""
    settings = CommitSettings(
        out_uri=job.output.uri,
        staging=staging_root(job.output.uri),
        storage=job.storage,
        task=job.task.kind,
        model="m",
        generation=job.generation.as_json(),
        passthrough=tuple(p.passthrough_columns),
        mapping=dict(job.input.columns),
        attempt="test",
    )
    tracker = CommitTracker(
        settings,
        p.shards,
        max_failure_rate=job.run.max_failure_rate,
        min_rows_before_abort=job.run.min_rows_before_abort,
        remote=False,
    )
    return tracker, WriteStage(staging_root(job.output.uri), job.storage)


def test_writer_commits_each_shard_once_despite_duplicates(local_job):
    job = local_job()
    p = plan(job)
    c, stage = _tracker(job, p)
    s0, s1, s2 = p.shards
    c.add(stage(_answers(s0, [0])))
    c.add(stage(_answers(s0, [0])))  # a retried task's duplicate
    assert committed_shards(job.output.uri, job.storage) == set()
    c.add(stage(_answers(s0, [1])))
    c.add(stage(pa.concat_tables([_answers(s1, [2, 3]), _answers(s0, [0, 1])])))  # s0: ignored
    c.add(stage(_answers(s2, [4])))
    assert c.finish() == []
    out = read_output(job.output.uri)
    assert out.column("id").to_pylist() == ["i0", "i1", "i2", "i3", "i4"]
    assert out.column("extra").to_pylist() == [1.5, 2.5, 3.5, 4.5, 5.5]
    stats = json.loads((Path(job.output.uri) / "_stats" / f"{s0.shard_id}.json").read_text())
    assert stats["rows"] == 2 and stats["statuses"] == {"ok": 2} and stats["tokens"] == 6
    # Each shard's staging went with its commit; only the copy staged after s0's commit is left
    # (run() clears _staging/ when it ends).
    left = list((Path(job.output.uri) / "_staging").glob("*/*.parquet"))
    assert [f.parent.name for f in left] == [s0.shard_id]


def test_writer_fills_rows_that_never_arrived(local_job):
    job = local_job()
    p = plan(job)
    c, stage = _tracker(job, p)
    c.add(stage(_answers(p.shards[0], [0])))
    assert c.missing() == {
        p.shards[0].shard_id: [1],
        p.shards[1].shard_id: [2, 3],
        p.shards[2].shard_id: [4],
    }
    assert sorted(c.finish()) == sorted(s.shard_id for s in p.shards)
    out = read_output(job.output.uri).to_pylist()
    assert [r["status"] for r in out] == ["ok"] + ["inference_error"] * 4
    assert "worker crash" in out[1]["error"]


def test_writer_aborts_when_failing_everywhere(local_job):
    job = local_job(run={"max_failure_rate": 0.5, "min_rows_before_abort": 3})
    p = plan(job)
    c, stage = _tracker(job, p)
    c.add(stage(_answers(p.shards[0], [0, 1], status="fetch_error")))
    with pytest.raises(JobAborted, match=r"3 of 3 rows failed .* fetch_error: boom"):
        c.add(stage(_answers(p.shards[1], [2], status="fetch_error")))


def test_manifest_errors_name_file_column_and_row(tmp_path, local_job):
    pq.write_table(pa.table({"id": [1, 2], "image": ["a", "b"]}), tmp_path / "ints.parquet")
    with pytest.raises(
        ManifestError, match=r"ints.parquet: column 'id' must be a string.*example row"
    ):
        plan(local_job(input={"uri": str(tmp_path / "ints.parquet")}, task={"kind": "caption"}))
    pq.write_table(pa.table({"id": ["a", None], "image": ["a", "b"]}), tmp_path / "null.parquet")
    with pytest.raises(ManifestError, match=r"null.parquet: column 'id' is null at row 1"):
        plan(local_job(input={"uri": str(tmp_path / "null.parquet")}, task={"kind": "caption"}))
    pq.write_table(pa.table({"id": ["a"], "image": ["x"]}), tmp_path / "noq.parquet")
    with pytest.raises(ManifestError, match=r"'question/questions' is required for task vqa"):
        plan(local_job(input={"uri": str(tmp_path / "noq.parquet")}))


def test_done_keys_mark_rows_unchanged(local_job):
    job = local_job()
    p, shards = _shard_rows(job)
    rows = ReadStage.for_job(job)(shards)
    first = FetchStage.for_job(job, default_policy(job, p.files), "fp")(rows)
    keys = sorted({int(k, 16) for ks in first.column("row_keys").to_pylist()[:2] for k in ks})
    again = FetchStage.for_job(
        job, default_policy(job, p.files), "fp", np.array(keys, dtype=np.uint64)
    )(rows)
    assert again.column("status").to_pylist()[:3] == ["unchanged", "unchanged", "ok"]
    other = FetchStage.for_job(
        job, default_policy(job, p.files), "fp2", np.array(keys, dtype=np.uint64)
    )(rows)
    assert other.column("status").to_pylist()[:2] == ["ok", "ok"]


def test_labeling_schema_questions_are_asked_of_every_row(tmp_path, local_job):
    pq.write_table(pa.table({"id": ["a", "b"], "image": ["x", "y"]}), tmp_path / "plain.parquet")
    job = local_job(
        input={"uri": str(tmp_path / "plain.parquet")},
        task={"kind": "vqa", "questions": ["Is there a person?", "图中有动物吗？"]},
    )
    _, shards = _shard_rows(job)
    rows = ReadStage.for_job(job)(shards).to_pylist()
    assert [r["questions"] for r in rows] == [["Is there a person?", "图中有动物吗？"]] * 2
    # With the manifest's own questions too: the schema's come first.
    job = local_job(task={"kind": "vqa", "questions": ["Schema?"]})
    _, shards = _shard_rows(job)
    assert ReadStage.for_job(job)(shards).to_pylist()[1]["questions"] == ["Schema?", "only one"]


def test_allowed_networks_reach_the_location_policy(local_job):
    base = {"allow_http": True, "allowed_locations": ["https://img.corp.example/"]}
    open_job = local_job(limits={**base, "allowed_networks": ["10.20.0.0/16"]})
    policy = default_policy(open_job, plan(open_job).files)
    policy = dataclasses.replace(policy, resolver=lambda host, port: ["10.20.3.4"])
    assert policy.check("https://img.corp.example/a.jpg") is None
    closed = dataclasses.replace(policy, allowed_networks=[])
    assert "private" in closed.check("https://img.corp.example/a.jpg")
    with pytest.raises(
        JobConfigError, match=r"limits.allowed_networks.*'10.20/x' is not a network"
    ):
        local_job(limits={**base, "allowed_networks": ["10.20/x"]})
