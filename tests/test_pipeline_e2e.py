"""End to end on a real local Ray, a real S3 server (moto over HTTP on 127.0.0.1), real Parquet,
real photographs and the tiny checkpoint: caption and VQA jobs with broken rows mixed in."""

from __future__ import annotations

import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from pipeline.builder import build, prepare, run
from pipeline.config import parse_job
from pipeline.output.layout import read_output
from pipeline.planning.manifest import ManifestError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bucket(moto_endpoint, photo_dir, tiny_checkpoint):
    """s3://e2e with photos, broken objects, the tiny model, and two manifests."""
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_endpoint}, skip_instance_cache=True)
    fs.mkdir("e2e")
    photos = sorted(photo_dir.glob("*.jpg"))
    for p in photos:
        fs.put_file(str(p), f"e2e/images/{p.name}")
    good = photos[0].read_bytes()
    fs.pipe_file("e2e/images/zero.jpg", b"")
    fs.pipe_file("e2e/images/truncated.jpg", good[: len(good) // 2])
    fs.pipe_file("e2e/images/text.jpg", b"not an image at all")
    fs.put(str(tiny_checkpoint.visual_dir), "e2e/model/visual", recursive=True)
    fs.put(str(tiny_checkpoint.llm_dir), "e2e/model/llm", recursive=True)

    uris = [f"s3://e2e/images/{p.name}" for p in photos] + [
        "s3://e2e/images/missing.jpg",
        "s3://e2e/images/zero.jpg",
        "s3://e2e/images/truncated.jpg",
        "s3://e2e/images/text.jpg",
    ]
    n = len(uris)
    ids = [f"r{i:02d}" for i in range(n)]
    caption = pa.table(
        {
            "id": ids,
            "image": uris,
            "source": [f"src-{i}" for i in range(n)],
            "tags": pa.array([[i, i + 1] for i in range(n)], pa.list_(pa.int16())),
        }
    )
    questions = [
        ["What is this?", "这是什么？"] if i % 2 == 0 else ["Describe it."] for i in range(n)
    ]
    questions[1] = []  # no question at all: invalid_question
    vqa = pa.table({"id": ids, "image": uris, "questions": questions})
    for name, table in (("caption", caption), ("vqa", vqa)):
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=3)
        fs.pipe_file(f"e2e/manifests/{name}/part-0.parquet", buf.getvalue())
    return {"fs": fs, "endpoint": moto_endpoint, "n": n, "photos": len(photos), "caption": caption}


def _job(bucket, kind: str, out: str, **extra):
    data = {
        "name": f"e2e-{kind}",
        "input": {"uri": f"s3://e2e/manifests/{kind}/"},
        "output": {"uri": f"s3://e2e/out/{out}", "rows_per_shard": 4},
        "task": {"kind": kind},
        "model": {
            "visual": "s3://e2e/model/visual",
            "llm": "s3://e2e/model/llm",
            "cache_dir": str(bucket["cache"]),
        },
        "generation": {"max_new_tokens": 6},
        "resources": {"actors": 1, "batch_size": 4},
        "storage": {"endpoint_url": bucket["endpoint"]},
    }
    for key, value in extra.items():
        data[key] = value
    return parse_job(data)


@pytest.fixture(scope="module", autouse=True)
def _cache(bucket, tmp_path_factory):
    bucket["cache"] = tmp_path_factory.mktemp("model-cache")


def test_caption_every_row_once_with_exact_statuses(ray_cluster, bucket):
    job = _job(bucket, "caption", "caption")
    summary = run(job)
    out = read_output(job.output.uri)
    n, photos = bucket["n"], bucket["photos"]
    assert out.num_rows == n == summary.rows_out == summary.rows_in
    assert sorted(out.column("id").to_pylist()) == sorted(
        bucket["caption"].column("id").to_pylist()
    )
    assert Counter(out.column("status").to_pylist()) == {
        "ok": photos,
        "fetch_error": 1,
        "decode_error": 3,
    }
    rows = {r["id"]: r for r in out.to_pylist()}
    for r in rows.values():
        assert (r["answer"] is not None) == (r["status"] == "ok")
        assert r["task"] == "caption" and r["question_index"] == 0
        assert r["model"] == summary.model
        assert json.loads(r["generation"])["max_new_tokens"] == 6
    # Pass-through columns keep their values and types.
    assert out.schema.field("tags").type == pa.list_(pa.int16())
    assert rows["r03"]["source"] == "src-3" and rows["r03"]["tags"] == [3, 4]
    assert "not found" in rows[f"r{photos:02d}"]["error"]
    # Layout: 3 shards of at most 4 rows, each with its stats file, then _SUCCESS and summary;
    # the staging is gone.
    keys = bucket["fs"].ls("e2e/out/caption/shards")
    assert len([k for k in keys if k.endswith(".parquet")]) == 3 == len(keys)
    assert len(bucket["fs"].ls("e2e/out/caption/_stats")) == 3
    assert not bucket["fs"].exists("e2e/out/caption/_staging")
    assert bucket["fs"].exists("e2e/out/caption/_SUCCESS")
    saved = json.loads(bucket["fs"].cat_file("e2e/out/caption/_summary.json"))
    assert saved["rows_out"] == n and saved["statuses"]["ok"] == photos
    # Efficiency (pipeline/runtime/efficiency.py): on CPU per model actor, no prefix cache, and no
    # roofline without resources.gpu_type (the roofline itself: tests/test_efficiency.py).
    eff = saved["efficiency"]
    assert eff == summary.efficiency
    assert eff["engine"] == "transformers" and eff["per"] == "model actor" and eff["devices"] == 1
    assert eff["output_tokens_per_s"] > 0 and eff["output_tokens_per_s_per_device"] > 0
    assert eff["images_encoded"] == photos and eff["images_per_s_per_device"] > 0
    assert 0 < eff["busy_fraction"] <= 1 and 0 < eff["busy_s"] <= eff["actor_wall_s"]
    assert eff["prefix_cache_hit_rate"] is None
    assert eff["gpu_type"] is None and eff["roofline_fraction"] is None
    print(f"e2e efficiency figures: {eff}")

    # A finished job rerun processes nothing and writes nothing.
    before = {k: bucket["fs"].info(k)["LastModified"] for k in bucket["fs"].find("e2e/out/caption")}
    again = run(job)
    assert again.rows_in == 0 and again.shards_skipped == 3
    after = {k: bucket["fs"].info(k)["LastModified"] for k in bucket["fs"].find("e2e/out/caption")}
    assert after == before


def test_vqa_one_row_per_question(ray_cluster, bucket):
    job = _job(bucket, "vqa", "vqa")
    summary = run(job)
    out = read_output(job.output.uri)
    n, photos = bucket["n"], bucket["photos"]
    expected_rows = sum(2 if i % 2 == 0 else 1 for i in range(n))  # row 1 has none: 1 row
    assert out.num_rows == expected_rows == summary.rows_out
    keys = Counter((r["id"], r["question_index"]) for r in out.to_pylist())
    assert max(keys.values()) == 1
    rows = {(r["id"], r["question_index"]): r for r in out.to_pylist()}
    assert rows[("r00", 1)]["question"] == "这是什么？" and rows[("r00", 1)]["status"] == "ok"
    assert rows[("r01", 0)]["status"] == "invalid_question"
    ok_images = {r["id"] for r in out.to_pylist() if r["status"] == "ok"}
    assert len(ok_images) == photos - 1  # r01 is a photo without a question


def test_preprocessing_is_not_fused_into_the_model_actor(ray_cluster, bucket):
    job = _job(bucket, "caption", "fusion-check")
    ctx = prepare(job)
    ds = build(ctx.plan.shards, ctx)
    stats = ds.materialize().stats()
    ops = [line for line in stats.splitlines() if line.startswith("Operator")]
    infer_ops = [line for line in ops if "InferStage" in line]
    assert infer_ops, stats
    assert any("MapBatches(BlockStage)" in line for line in ops), ops  # read+fetch+preprocess
    # Fused, the operator would be named "MapBatches(BlockStage)->MapBatches(InferStage)".
    assert all("BlockStage" not in line for line in infer_ops), infer_ops


def test_broken_manifest_stops_before_model_work(ray_cluster, bucket):
    fs = bucket["fs"]
    bad = pa.table({"id": ["a", "b", "a"], "image": ["s3://e2e/x.jpg"] * 3})
    fs.pipe_file("e2e/manifests/dup/part-0.parquet", _parquet(bad))
    job = _job(bucket, "caption", "dup", input={"uri": "s3://e2e/manifests/dup/"})
    with pytest.raises(ManifestError, match=r"'id' must be unique.*'a'.*part-0.parquet"):
        run(job)
    noimg = pa.table({"id": ["a"], "picture": ["x"]})
    fs.pipe_file("e2e/manifests/noimg/part-0.parquet", _parquet(noimg))
    job = _job(bucket, "caption", "noimg", input={"uri": "s3://e2e/manifests/noimg/"})
    with pytest.raises(ManifestError, match=r"noimg/part-0.parquet: column 'image/image_bytes'"):
        run(job)
    assert not fs.exists("e2e/out/dup") and not fs.exists("e2e/out/noimg")


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
