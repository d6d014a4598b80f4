"""Driver memory against manifest size: the driver streams answer rows into shard commits, so
its peak memory should stay nearly flat when the manifest grows tenfold (target <= 1.2x).

    .venv/bin/python bench/bench_driver_memory.py                  # N = 20000 and 10 x N rows
    .venv/bin/python bench/bench_driver_memory.py --rows 2000 --rows-per-shard 100

The model is a stand-in whose `encode_images` / `answer_batch` return at once, so the figures
are the driver's (Ray Data's executor, the stream, the `ShardCommitter`), not a model's. Rows are
`image_bytes` of one small JPEG in a local Parquet manifest; the output goes to a local
directory. Each size runs in a fresh subprocess with its own local Ray (a process's memory
high-water mark only grows): a small warm-up job first (imports, Ray Data's first-use caches),
then the measured job, while a thread samples the driver's RSS every 20 ms. Printed per size:
RSS before the job, its peak and growth, VmHWM, wall time and rows/s, split into planning
(`prepare`: manifest checks, which hold every id to check they are unique; until the first
answer batch reaches the driver) and streaming (from there to the end, with the peaks of its
first and second halves: a driver that streams levels off); then the 10xN / N ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# A small image size keeps the pixel arrays (and so the object store traffic) small: the
# benchmark is about the driver, not about moving pixels.
IMAGE_SIZE = 32


class StandInAnswer:
    def __init__(self, text: str, num_tokens: int):
        self.text, self.num_tokens = text, num_tokens


class StandInLoader:
    """Picklable loader: a model surface that answers instantly, a no-op processor."""

    def __call__(self):
        from types import SimpleNamespace

        import torch

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
                self.vision_model = SimpleNamespace(dtype=torch.float32)
                self.language_model = SimpleNamespace(dtype=torch.float32)

            def encode_images(self, pixel_values):
                return torch.zeros(pixel_values.shape[0], 1, 1)

            def answer_batch(self, tokenizer, queries, image_embeds, **_):
                return [StandInAnswer("a stand-in answer", 4) for _ in queries]

        processor = SimpleNamespace(image_size=IMAGE_SIZE, normalize=lambda t, dtype: t)
        return Model(), None, processor


def _model_dirs(root: Path) -> tuple[str, str]:
    """The tiny checkpoint's directories (the driver reads its configs for the model identity
    and the image size), with the vision image size set to IMAGE_SIZE."""
    from ziya_model import write_tiny_checkpoint

    tiny = write_tiny_checkpoint(root / "tiny")
    cfg_path = Path(tiny.visual_dir) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("vision_config", {})["image_size"] = IMAGE_SIZE
    cfg_path.write_text(json.dumps(cfg))
    return str(tiny.visual_dir), str(tiny.llm_dir)


def _manifest(path: Path, rows: int, row_group: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (30, 120, 200)).save(buf, "JPEG", quality=80)
    table = pa.table(
        {
            "id": pa.array([f"row-{i:09d}" for i in range(rows)]),
            "image_bytes": pa.array([buf.getvalue()] * rows, pa.binary()),
            "source": pa.array([f"src-{i % 97}" for i in range(rows)]),
        }
    )
    pq.write_table(table, path, row_group_size=row_group)


def _job(root: Path, manifest: Path, out: Path, visual: str, llm: str, rows_per_shard: int):
    from pipeline.config import parse_job

    return parse_job(
        {
            "name": "bench-driver-memory",
            "input": {"uri": str(manifest)},
            "output": {"uri": str(out), "rows_per_shard": rows_per_shard},
            "model": {"visual": visual, "llm": llm},
            "generation": {"max_new_tokens": 4},
            "resources": {
                "actors": 1,
                "cpus_per_actor": 0,
                "batch_size": 256,
                "preprocess_batch_size": 256,
            },
            "limits": {"allowed_locations": [str(root) + "/"], "max_image_pixels": 1_000_000},
            "run": {"mode": "overwrite"},
        }
    )


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _vmhwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(root: Path, rows: int, rows_per_shard: int) -> dict:
    """Run inside the fresh subprocess: warm up, then measure one job of `rows` rows."""
    import ray

    from pipeline.builder import run

    visual, llm = str(root / "tiny" / "visual"), str(root / "tiny" / "llm")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=str(root / "ray"),
        configure_logging=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    warm = _job(root, root / "warm.parquet", root / "out-warm", visual, llm, rows_per_shard)
    run(warm, loader=StandInLoader())

    job = _job(root, root / f"m-{rows}.parquet", root / f"out-{rows}", visual, llm, rows_per_shard)
    before = _rss()
    samples: list[tuple[float, int]] = [(time.perf_counter(), before)]
    done = threading.Event()
    stream_start: list[tuple[float, int]] = []

    def sample() -> None:
        while not done.wait(0.02):
            samples.append((time.perf_counter(), _rss()))

    def progress(tally, total: int, elapsed: float) -> None:
        if not stream_start:  # the first answer batch reached the driver
            stream_start.append((time.perf_counter(), _rss()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    summary = run(job, progress=progress, loader=StandInLoader())
    t1 = time.perf_counter()
    done.set()
    sampler.join()
    samples.append((t1, _rss()))
    assert summary.rows_out == rows and summary.statuses == {"ok": rows}, summary
    ray.shutdown()
    ts, rss_stream = stream_start[0]
    planning = [r for t, r in samples if t < ts] or [before]
    streaming = [r for t, r in samples if t >= ts] + [rss_stream]
    mid = ts + (t1 - ts) / 2
    return {
        "rows": rows,
        "shards": summary.shards_committed,
        "rss_before": before,
        "peak_planning": max(planning),
        "rss_stream_start": rss_stream,
        "peak_streaming": max(streaming),
        "peak_stream_first_half": max([r for t, r in samples if ts <= t < mid] + [rss_stream]),
        "peak_stream_second_half": max([r for t, r in samples if t >= mid] + [rss_stream]),
        "vmhwm": _vmhwm(),
        "wall_s": t1 - t0,
        "rows_per_s": rows / (t1 - t0),
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="N (the second run has 10xN)")
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(Path(args.root), args.child, args.rows_per_shard)))
        return

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = Path(tempfile.mkdtemp(prefix="bench-driver-mem-", dir="/tmp"))
    try:
        _model_dirs(root)
        sizes = [args.rows, args.rows * args.factor]
        _manifest(root / "warm.parquet", 2 * args.rows_per_shard, args.rows_per_shard)
        for n in sizes:
            _manifest(root / f"m-{n}.parquet", n, args.rows_per_shard)
        results = []
        for n in sizes:
            cmd = [sys.executable, __file__, "--child", str(n), "--root", str(root)]
            cmd += ["--rows-per-shard", str(args.rows_per_shard)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.exit(f"child for {n} rows failed:\n{proc.stderr[-4000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"driver RSS, rows_per_shard={args.rows_per_shard}, stand-in model")
        for r in results:
            top = max(r["peak_planning"], r["peak_streaming"])
            print(
                f"  {r['rows']:>9,} rows, {r['shards']:,} shards, {r['wall_s']:.1f} s "
                f"({r['rows_per_s']:.0f} rows/s): before the job {_mib(r['rss_before'])}, "
                f"peak {_mib(top)} (growth {_mib(top - r['rss_before'])}), VmHWM "
                f"{_mib(r['vmhwm'])}\n"
                f"      planning (manifest checks, until the first answers): peak "
                f"{_mib(r['peak_planning'])}\n"
                f"      streaming: from {_mib(r['rss_stream_start'])} to a peak of "
                f"{_mib(r['peak_streaming'])} (growth "
                f"{_mib(r['peak_streaming'] - r['rss_stream_start'])}; first half peak "
                f"{_mib(r['peak_stream_first_half'])}, second half "
                f"{_mib(r['peak_stream_second_half'])})"
            )
        small, big = results

        def peak(r: dict) -> int:
            return max(r["peak_planning"], r["peak_streaming"])

        def ratio(key: str, base: str | None) -> float:
            def grown(r: dict) -> int:
                top = peak(r) if key == "peak" else r[key]
                return max(top - (r[base] if base else 0), 1)

            return grown(big) / grown(small)

        print(
            f"  {args.factor}xN / N: peak RSS {ratio('peak', None):.2f}x (target <= 1.2x); "
            f"growth over the job {ratio('peak', 'rss_before'):.2f}x; streaming growth "
            f"{ratio('peak_streaming', 'rss_stream_start'):.2f}x"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
