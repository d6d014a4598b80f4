"""The whole pipeline vs its model stage alone: tiny model, a few thousand local JPEGs, one run.

    python bench/bench_pipeline.py                          # 2,000 photos 640x480, 32 new tokens
    python bench/bench_pipeline.py --images 4000 --new-tokens 16 --batch 32

Writes the tiny checkpoint and `--images` distinct JPEG files (scikit-image's photographs with
small variations: crop, mirror, brightness) to a temp dir, then, in this one process:
  pipeline     `pipeline.builder.run(job)` on a local Ray (all cores): manifest -> read -> fetch
               -> decode/preprocess (fast path) -> InferStage actor(s) with the tiny model ->
               committed Parquet shards + summary. Timed end to end (Ray start excluded), and
               from the first model call to the end (start-up excluded).
  model alone  InferStage called directly in this process on the same rows, already read,
               fetched and preprocessed by the same stage classes (not timed), in batches of the
               same size, same generation settings, with as many torch threads as the actor has
               CPUs.
Prints rows/s of each and their ratio: how much of the model stage's own speed the whole
pipeline keeps. On a 2-core machine the actor's core is the model's and the other core does
read + fetch + preprocess + the driver, so the ratio is below 1 wherever preprocessing one image
costs more than answering it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import init_ray, machine, make_photos, write_manifest
from bench.standin import LOADED, TimedLoader, read_busy_log


def make_job(work: Path, manifest: Path, args):
    from pipeline.config import parse_job

    return parse_job(
        {
            "name": "bench-pipeline",
            "input": {"uri": str(manifest)},
            "output": {"uri": str(work / "out"), "rows_per_shard": args.rows_per_shard},
            "task": {"kind": "caption", "caption_prompt": "Describe the image in detail."},
            "model": {"visual": str(work / "tiny/visual"), "llm": str(work / "tiny/llm")},
            "generation": {"max_new_tokens": args.new_tokens},
            "resources": {
                "actors": args.actors,
                "cpus_per_actor": args.cpus_per_actor,
                "batch_size": args.batch,
                "preprocess_batch_size": args.preprocess_batch,
            },
            "limits": {"allowed_locations": [str(work / "images") + "/"]},
            "run": {"mode": "overwrite"},
        }
    )


def run_pipeline(job, log: Path) -> dict:
    from pipeline.builder import run
    from pipeline.runtime.weights import ModelLoader

    t0 = time.time()
    summary = run(job, loader=TimedLoader(ModelLoader(job), str(log)))
    wall = time.time() - t0
    assert summary.rows_out == summary.rows_in, summary
    calls = [c for c in read_busy_log(str(log)) if c[3] != LOADED]
    first = calls[0][1] - t0
    return {
        "rows": summary.rows_in,
        "statuses": summary.statuses,
        "wall_s": wall,
        "first_call_s": first,
        "rows_per_s": summary.rows_in / wall,
        "steady_rows_per_s": summary.rows_in / (wall - first),
        "model_busy": sum(c[2] - c[1] for c in calls) / (job.resources.actors * wall),
    }


def preprocessed_batches(job) -> list[pa.Table]:
    """The job's rows through the real read, fetch and preprocess stages, in model batches."""
    from pipeline.builder import prepare
    from pipeline.stages.fetch import FetchStage
    from pipeline.stages.preprocess import PreprocessStage
    from pipeline.stages.read import ReadStage

    ctx = prepare(job)
    shards = pa.Table.from_pylist(
        [
            {"shard_id": s.shard_id, "path": s.path, "start": s.start, "end": s.end}
            for s in ctx.plan.shards
        ]
    )
    rows = ReadStage.for_job(job)(shards)
    fetch = FetchStage.for_job(job, ctx.policy, ctx.fingerprint)
    preprocess = PreprocessStage(ctx.image_size, job.limits.max_image_pixels, job.preprocess.mode)
    size = job.resources.batch_size
    return [preprocess(fetch(rows.slice(i, size))) for i in range(0, rows.num_rows, size)]


def run_model_alone(job, batches: list[pa.Table]) -> dict:
    import torch

    from pipeline.builder import _generation
    from pipeline.runtime.weights import ModelLoader
    from pipeline.stages.infer import InferStage

    torch.set_num_threads(max(1, int(job.resources.cpus_per_actor)))
    stage = InferStage(ModelLoader(job), _generation(job), job.resources.batch_size)
    stage(batches[0])  # warm-up, as the actor's first batch would be
    start = time.perf_counter()
    rows = sum(stage(b).num_rows for b in batches)
    seconds = time.perf_counter() - start
    return {"rows": rows, "wall_s": seconds, "rows_per_s": rows / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="distinct JPEG files = rows")
    parser.add_argument("--photo-size", type=str, default="640x480", help="JPEG size WxH")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32, help="rows per model batch")
    parser.add_argument("--preprocess-batch", type=int, default=128)
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=1)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.photo_size.split("x"))

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        from ziya_model import write_tiny_checkpoint

        print(f"machine: {machine()}")
        write_tiny_checkpoint(work / "tiny")
        start = time.perf_counter()
        images = make_photos(work / "images", args.images, (width, height))
        print(
            f"{len(images)} JPEG files of {width}x{height} written in "
            f"{time.perf_counter() - start:.0f} s; caption, max_new_tokens={args.new_tokens}, "
            f"batch {args.batch}, {args.actors} actor(s) x {args.cpus_per_actor:g} CPU"
        )
        manifest = write_manifest(work / "manifest.parquet", images, len(images))
        job = make_job(work, manifest, args)
        init_ray()
        pipe = run_pipeline(job, work / "calls.log")
        batches = preprocessed_batches(job)
        alone = run_model_alone(job, batches)
        print(
            f"  pipeline     {pipe['rows']} rows in {pipe['wall_s']:.1f} s: "
            f"{pipe['rows_per_s']:.1f} rows/s end to end; first model call at "
            f"{pipe['first_call_s']:.1f} s; {pipe['steady_rows_per_s']:.1f} rows/s from it to "
            f"the end; model busy {pipe['model_busy']:.2f} of the wall time; {pipe['statuses']}"
        )
        print(
            f"  model alone  {alone['rows']} rows in {alone['wall_s']:.1f} s: "
            f"{alone['rows_per_s']:.1f} rows/s (InferStage on preprocessed batches)"
        )
        print(
            f"pipeline / model alone: {pipe['rows_per_s'] / alone['rows_per_s']:.2f} end to end, "
            f"{pipe['steady_rows_per_s'] / alone['rows_per_s']:.2f} after the first model call"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
