"""Progress lines during a run, and Ray metrics (scraped from Ray's own Prometheus endpoint)
that match the run summary."""

from __future__ import annotations

import io
import re
import time
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.run import Progress, format_summary
from pipeline.builder import run
from pipeline.config import parse_job

pytestmark = pytest.mark.slow


def _scrape(ray) -> str:
    port = ray.nodes()[0]["MetricsExportPort"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _values(text: str, name: str, **tags: str) -> list[float]:
    out = []
    for line in text.splitlines():
        if not line.startswith(f"ray_{name}{{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in tags.items()):
            out.append(float(line.rsplit(" ", 1)[1]))
    return out


def test_progress_and_metrics_match_summary(ray_cluster, tmp_path, photo_dir, tiny_checkpoint):
    photos = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    images = [*photos, str(tmp_path / "missing.jpg")]
    pq.write_table(
        pa.table({"id": [f"m{i}" for i in range(len(images))], "image": images}),
        tmp_path / "m.parquet",
    )
    job = parse_job(
        {
            "name": "metrics-check",
            "input": {"uri": str(tmp_path / "m.parquet")},
            "output": {"uri": str(tmp_path / "out"), "rows_per_shard": 2},
            "model": {
                "visual": str(tiny_checkpoint.visual_dir),
                "llm": str(tiny_checkpoint.llm_dir),
            },
            "generation": {"max_new_tokens": 5},
            "resources": {"batch_size": 2},
            "limits": {"allowed_locations": [str(photo_dir) + "/", str(tmp_path) + "/"]},
        }
    )
    stream = io.StringIO()
    progress = Progress(stream=stream)
    progress.last = -1e9  # print the first update at once
    summary = run(job, progress=lambda *a: (progress(*a), setattr(progress, "last", -1e9)))
    lines = stream.getvalue().splitlines()
    assert lines, "no progress printed"
    assert re.match(
        r"rows 7/7 \(100%\)  [\d.]+ rows/s  ETA \S+  failures 1  shards \d+", lines[-1]
    ), lines[-1]
    assert summary.statuses == {"ok": len(photos), "fetch_error": 1}
    table = format_summary(summary)
    assert "rows out" in table and "fetch_error" in table and "images/s" in table

    deadline = time.time() + 60
    while True:  # Ray exports metrics every few seconds
        text = _scrape(ray_cluster)
        ok = _values(text, "ziya_batch_rows_total", job="metrics-check", status="ok")
        failed = _values(text, "ziya_batch_rows_total", job="metrics-check", status="fetch_error")
        tokens = _values(text, "ziya_batch_tokens_total", job="metrics-check")
        if (ok and failed and tokens and sum(ok) == len(photos)) or time.time() > deadline:
            break
        time.sleep(2)
    assert sum(ok) == summary.statuses["ok"]
    assert sum(failed) == summary.statuses["fetch_error"]
    assert sum(tokens) == summary.tokens > 0
    assert _values(text, "ziya_batch_shards_committed_total", job="metrics-check") == [4.0]
    # Actor-side metrics are registered and exported too.
    assert _values(text, "ziya_batch_model_load_seconds")
    assert _values(text, "ziya_batch_batch_latency_seconds_count")
    assert _values(text, "ziya_batch_actor_images_per_second")
