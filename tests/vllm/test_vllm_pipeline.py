"""A job with `model.engine: vllm` end to end: local Ray, moto S3, the tiny checkpoint, broken
rows mixed in. Same statuses, same rows exactly once, and (greedy, fp32) the same answers as the
transformers engine on the same manifest; the summary reports the prefix cache.

The engine runs with vLLM's worker process (its default), so the model class is found through
the `vllm.general_plugins` entry point, as on a cluster.
"""

from __future__ import annotations

import io
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from pipeline.builder import run
from pipeline.config import parse_job
from pipeline.output.layout import read_output

pytestmark = pytest.mark.slow

BUCKET = "vllm-e2e"


@pytest.fixture(scope="module")
def bucket(moto_endpoint, photo_dir, tiny_checkpoint, tmp_path_factory):
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_endpoint}, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    photos = sorted(photo_dir.glob("*.jpg"))
    for p in photos:
        fs.put_file(str(p), f"{BUCKET}/images/{p.name}")
    fs.pipe_file(f"{BUCKET}/images/truncated.jpg", photos[0].read_bytes()[:500])
    fs.put(str(tiny_checkpoint.visual_dir), f"{BUCKET}/model/visual", recursive=True)
    fs.put(str(tiny_checkpoint.llm_dir), f"{BUCKET}/model/llm", recursive=True)
    uris = [f"s3://{BUCKET}/images/{p.name}" for p in photos]
    uris += [f"s3://{BUCKET}/images/missing.jpg", f"s3://{BUCKET}/images/truncated.jpg"]
    n = len(uris)
    questions = [
        ["What is this?", "这是什么？", "Is there a dog?", "What color is it?"]
        if i % 2 == 0
        else ["Describe it."]
        for i in range(n)
    ]
    questions[1] = [""]  # invalid_question
    table = pa.table({"id": [f"r{i:02d}" for i in range(n)], "image": uris, "questions": questions})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.pipe_file(f"{BUCKET}/manifests/vqa/part-0.parquet", buf.getvalue())
    return {"fs": fs, "endpoint": moto_endpoint, "cache": tmp_path_factory.mktemp("cache")}


def _job(bucket, out: str, engine: str):
    return parse_job(
        {
            "name": f"vllm-e2e-{engine}",
            "input": {"uri": f"s3://{BUCKET}/manifests/vqa/"},
            "output": {"uri": f"s3://{BUCKET}/out/{out}", "rows_per_shard": 3},
            "task": {"kind": "vqa"},
            "model": {
                "visual": f"s3://{BUCKET}/model/visual",
                "llm": f"s3://{BUCKET}/model/llm",
                "cache_dir": str(bucket["cache"]),
                "engine": engine,
                "vllm": {
                    "max_model_len": 512,
                    "enforce_eager": True,
                    "block_size": 32,
                    "cpu_kvcache_gib": 1,
                    "max_num_seqs": 32,
                },
            },
            "generation": {"max_new_tokens": 8},
            "resources": {"actors": 1, "batch_size": 4},
            "storage": {"endpoint_url": bucket["endpoint"]},
        }
    )


def test_vllm_job_matches_the_transformers_job_row_for_row(ray_cluster, bucket):
    reference = run(_job(bucket, "transformers", "transformers"))
    job = _job(bucket, "vllm", "vllm")
    summary = run(job)
    want = {(r["id"], r["question_index"]): r for r in read_output(reference.output).to_pylist()}
    out = read_output(job.output.uri).to_pylist()
    got = {(r["id"], r["question_index"]): r for r in out}
    # Every (row, question) exactly once, with the same status, and the same greedy answer.
    assert len(out) == len(got) == len(want) == summary.rows_out
    assert got.keys() == want.keys()
    assert Counter(r["status"] for r in out) == Counter(r["status"] for r in want.values())
    assert {"ok", "fetch_error", "decode_error", "invalid_question"} <= {r["status"] for r in out}
    for key, r in got.items():
        assert (r["status"], r["answer"], r["num_tokens"]) == (
            want[key]["status"],
            want[key]["answer"],
            want[key]["num_tokens"],
        ), key
    assert summary.model.endswith("+vllm") and all(r["model"] == summary.model for r in out)
    # Four questions on each even photo: the later three reuse the image's cached blocks.
    engine = summary.engine
    assert engine["name"] == "vllm" and engine["requests"] == summary.statuses["ok"]
    assert engine["cached_prompt_tokens"] >= 32 * 3 and 0 < engine["prefix_cache_hit_rate"] < 1
    assert 0 < engine["busy_fraction"] <= 1
    print(f"vllm e2e engine figures: {engine}")
    # The efficiency section (both engines): vLLM's hit rate and its own busy figure.
    eff = summary.efficiency
    assert eff["engine"] == "vllm" and eff["per"] == "model actor"
    assert eff["prefix_cache_hit_rate"] == engine["prefix_cache_hit_rate"]
    assert eff["busy_fraction"] == engine["busy_fraction"] and eff["busy_s"] == engine["busy_s"]
    assert eff["output_tokens_per_s"] > 0 and eff["images_per_s_per_device"] > 0
    assert eff["roofline_fraction"] is None  # no GPU, no resources.gpu_type
    ref = reference.efficiency
    assert ref["engine"] == "transformers" and ref["prefix_cache_hit_rate"] is None
    assert 0 < ref["busy_fraction"] <= 1
    print(f"transformers e2e efficiency figures: {ref}")
    print(f"vllm e2e efficiency figures: {eff}")

    # A finished job rerun does nothing (resume skips every committed shard).
    again = run(job)
    assert again.rows_in == 0 and again.shards_skipped == summary.shards_total
