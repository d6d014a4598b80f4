"""Pipeline overhead: the whole pipeline around a stand-in model that only sleeps, vs its bound.

    python bench/bench_overhead.py                       # 1 actor / 3,200 rows, 4 / 25,600
    python bench/bench_overhead.py --quick               # 1 actor / 640 rows, 4 / 2,560
    python bench/bench_overhead.py --actors 1 --rows 12800 --no-reference   # a longer run

The stand-in (`bench/standin.py`) sleeps `--sleep` seconds per batch of `--batch` rows and asks
Ray for no CPU, so N actors cannot exceed N x batch / sleep rows/s (the bound) and every core is
left to read, fetch and preprocess. Images are `--photos` distinct small JPEG files (224x224,
decoding ~0.3 ms) on local disk, so the CPU side is cheap. For each actor count, in one run on
one local Ray, after an untimed warm-up of both pipelines (Ray's task workers then have their
imports; actors are new processes in every run, so their start-up is in the figures):
  ziya-batch   `pipeline.builder.run(job, loader=StandInLoader(...))`: manifest -> read ->
               fetch -> decode/preprocess (fast path) -> InferStage with the stand-in -> the
               driver's shard commits (Parquet) + summary.json
  reference    plain Ray Data with default settings: read_parquet -> map_batches (open the file,
               the same decode + preprocess) -> actor map_batches (the same stand-in, num_cpus=0)
               -> write_parquet
Printed per pipeline:
  - rows/s end to end as a fraction of the bound (target >= 0.95 where the CPU budget suffices);
  - steady state: rows/s while every actor was up (from the first call of the last actor to
    start to the last call of the first actor to finish), as a fraction of the bound;
  - busy: time inside the stand-in / (actors x wall time);
  - when the actors were ready and the first batch started, idle time between an actor's calls,
    time after the last call, mean call length (the sleep plus late wake-ups), partial batches.
With `--capacity` (default) each pipeline runs again around a model taking no time: the rows/s
the CPU side delivers on this machine at this moment, which says whether the bound is reachable.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import init_ray, machine, make_photos, wait_idle, write_manifest
from bench.standin import LOADED, StandInActor, StandInLoader, read_busy_log


@dataclass
class Result:
    name: str
    actors: int
    rows: int
    wall_s: float
    bound: float  # rows/s the stand-in stage allows
    log: list  # [(pid, start, end, rows)]; rows == LOADED marks an actor's model load
    t0: float

    @property
    def calls(self) -> list:
        return [c for c in self.log if c[3] != LOADED]

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s

    @property
    def fraction(self) -> float:
        return self.rows_per_s / self.bound

    @property
    def ready_s(self) -> float:
        """When the last actor had its model loaded (from the start of the run)."""
        loads = [c[1] for c in self.log if c[3] == LOADED]
        return max(loads) - self.t0 if loads else float("nan")

    @property
    def first_batch_s(self) -> float:
        return self.calls[0][1] - self.t0 if self.calls else float("nan")

    def _window(self) -> tuple[float, float]:
        """From the first call of the last actor to start, to the last call of the first to
        finish: the stretch when every actor was up and work was left for all."""
        pids = {c[0] for c in self.calls}
        first = max(min(c[1] for c in self.calls if c[0] == p) for p in pids)
        last = min(max(c[2] for c in self.calls if c[0] == p) for p in pids)
        return first, last

    @property
    def steady_rows_per_s(self) -> float:
        """Rows answered per second inside the window (start-up and drain left out)."""
        if not self.calls:
            return float("nan")
        lo, hi = self._window()
        if hi - lo < 2.0:
            return float("nan")
        rows = 0.0
        for _, start, end, n in self.calls:
            if end <= start:  # a model taking no time: count the call where it happened
                rows += n if lo <= start <= hi else 0
                continue
            rows += n * max(0.0, min(end, hi) - max(start, lo)) / (end - start)
        return rows / (hi - lo)

    @property
    def steady_fraction(self) -> float:
        return self.steady_rows_per_s / self.bound

    @property
    def busy(self) -> float:
        return sum(end - start for _, start, end, _ in self.calls) / (self.actors * self.wall_s)

    @property
    def tail_s(self) -> float:
        """From the end of the last model call to the end of the run (output, commits)."""
        return self.t0 + self.wall_s - max(c[2] for c in self.calls) if self.calls else 0.0

    @property
    def gaps_s(self) -> float:
        """Idle time between consecutive calls of the same actor, summed over actors."""
        gaps = 0.0
        for pid in {c[0] for c in self.calls}:
            mine = [c for c in self.calls if c[0] == pid]
            gaps += sum(max(0.0, b[1] - a[2]) for a, b in itertools.pairwise(mine))
        return gaps

    @property
    def mean_call_s(self) -> float:
        """Mean time inside the stand-in per call (its sleep plus any late wake-up)."""
        return sum(c[2] - c[1] for c in self.calls) / max(len(self.calls), 1)

    def partial(self, batch: int) -> int:
        return sum(1 for c in self.calls if c[3] < batch)

    def line(self, batch: int) -> str:
        return (
            f"  {self.name:<10} {self.actors} actor(s) {self.rows:6d} rows: "
            f"wall {self.wall_s:5.1f} s, {self.rows_per_s:5.1f} rows/s = {self.fraction:.3f} "
            f"of the bound; steady state {self.steady_fraction:.3f}; busy {self.busy:.3f}\n"
            f"  {'':<10} actors ready at {self.ready_s:4.1f} s, first batch at "
            f"{self.first_batch_s:4.1f} s, idle between calls {self.gaps_s:4.1f} s (all actors), "
            f"after the last call {self.tail_s:4.1f} s; {len(self.calls)} calls of "
            f"{self.mean_call_s * 1000:.1f} ms on average, {self.partial(batch)} on partial batches"
        )


def run_ziya(
    work: Path, manifest: Path, images: Path, actors: int, args, tag="", sleep=None
) -> Result:
    from pipeline.builder import run
    from pipeline.config import parse_job

    out, log = work / f"out-ziya-{actors}{tag}", work / f"busy-ziya-{actors}{tag}.log"
    tiny = work / "tiny"
    job = parse_job(
        {
            "name": f"overhead-{actors}",
            "input": {"uri": str(manifest)},
            "output": {"uri": str(out), "rows_per_shard": args.rows_per_shard},
            "model": {"visual": str(tiny / "visual"), "llm": str(tiny / "llm")},
            "generation": {"max_new_tokens": 1},
            "resources": {
                "actors": actors,
                "cpus_per_actor": 0,
                "batch_size": args.batch,
                "preprocess_batch_size": args.preprocess_batch,
            },
            "limits": {"allowed_locations": [str(images) + "/"]},
            "run": {"mode": "overwrite"},
        }
    )
    sleep = args.sleep if sleep is None else sleep
    loader = StandInLoader(sleep, 224, str(log))
    t0 = time.time()
    summary = run(job, loader=loader)
    wall = time.time() - t0
    assert summary.rows_out == summary.rows_in, summary
    assert summary.statuses == {"ok": summary.rows_in}, summary.statuses
    bound = actors * args.batch / sleep if sleep else float("inf")
    return Result("ziya-batch", actors, summary.rows_in, wall, bound, read_busy_log(str(log)), t0)


def _reference_preprocess(batch: pa.Table) -> dict:
    """The same file read + decode + fast preprocessing as the pipeline's stages."""
    from ziya_model.processing import ZiyaImageProcessor, decode_image

    processor = ZiyaImageProcessor(224)
    pixels = []
    for uri in batch.column("image").to_pylist():
        with open(uri, "rb") as f:
            image = decode_image(f.read(), draft_size=224)
        pixels.append(processor.preprocess_uint8(image).tobytes())
    return {"id": batch.column("id").to_numpy(zero_copy_only=False), "pixels": pixels}


def run_reference(work: Path, manifest: Path, actors: int, args, tag="", sleep=None) -> Result:
    import ray

    out, log = work / f"out-ref-{actors}{tag}", work / f"busy-ref-{actors}{tag}.log"
    sleep = args.sleep if sleep is None else sleep
    t0 = time.time()
    ds = ray.data.read_parquet(str(manifest))
    ds = ds.map_batches(_reference_preprocess, batch_size=args.batch, batch_format="pyarrow")
    ds = ds.map_batches(
        StandInActor,
        fn_constructor_args=(sleep, str(log)),
        batch_size=args.batch,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=0,
    )
    ds.write_parquet(str(out))
    wall = time.time() - t0
    rows = ray.data.read_parquet(str(out)).count()
    assert rows == pq.read_metadata(manifest).num_rows
    bound = actors * args.batch / sleep if sleep else float("inf")
    return Result("reference", actors, rows, wall, bound, read_busy_log(str(log)), t0)


def preprocess_rate(images: list[Path], rounds: int = 3) -> float:
    """Images/s per core of fetch (file read) + decode + fast preprocessing, on this process."""
    import torch

    from ziya_model.processing import ZiyaImageProcessor, decode_image

    torch.set_num_threads(1)
    processor = ZiyaImageProcessor(224)
    blobs = [p.read_bytes() for p in images[:64]]
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for blob in blobs:
            processor.preprocess_uint8(decode_image(io.BytesIO(blob).read(), draft_size=224))
        best = min(best, time.perf_counter() - start)
    return len(blobs) / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sleep", type=float, default=0.2, help="stand-in seconds per batch")
    parser.add_argument("--batch", type=int, default=32, help="rows per model batch")
    # 128 rows per fetch/preprocess task: these 224x224 JPEGs decode in ~0.3 ms, so with 32
    # rows Ray's per-task cost (scheduling, block transfer) would rival the work itself.
    parser.add_argument("--preprocess-batch", type=int, default=128)
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--actors", type=str, default="1,4")
    parser.add_argument("--rows", type=str, default="3200,25600", help="rows per actor count")
    parser.add_argument("--photo-size", type=str, default="224x224", help="JPEG size WxH")
    parser.add_argument("--photos", type=int, default=256, help="distinct JPEG files")
    parser.add_argument("--quick", action="store_true", help="640 / 2,560 rows")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument(
        "--capacity",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run each pipeline around a model taking no time (CPU-side capacity)",
    )
    parser.add_argument("--json", type=str, default=None, help="also write results here")
    args = parser.parse_args(argv)
    actor_counts = [int(a) for a in args.actors.split(",")]
    row_counts = [int(r) for r in ("640,2560" if args.quick else args.rows).split(",")]
    width, height = (int(v) for v in args.photo_size.split("x"))

    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    try:
        from ziya_model import write_tiny_checkpoint

        write_tiny_checkpoint(work / "tiny")  # prepare() reads the model's config and identity
        images = make_photos(work / "images", args.photos, (width, height))
        print(f"machine: {machine()}")
        rate = preprocess_rate(images)
        print(
            f"{len(images)} JPEG files of {width}x{height}; read + decode + preprocess "
            f"{rate:.0f} images/s per core (this process)"
        )
        init_ray()
        # Warm-up (untimed): both pipelines once, so Ray's task workers have imported torch and
        # the stages before timing starts. Actors are new processes in every run: their start-up
        # stays in the figures.
        warm = write_manifest(work / "manifest-warm.parquet", images, 2 * args.batch)
        run_ziya(work, warm, work / "images", 1, args, tag="warm")
        run_reference(work, warm, 1, args, tag="warm")
        results = []
        capacity: dict = {}
        for actors, rows in zip(actor_counts, row_counts, strict=True):
            manifest = write_manifest(work / f"manifest-{actors}.parquet", images, rows)
            bound = actors * args.batch / args.sleep
            print(
                f"{actors} stand-in actor(s), {rows} rows, {args.sleep} s per batch of "
                f"{args.batch}: bound {bound:.0f} rows/s (model stage alone {rows / bound:.1f} s)"
            )
            names = ["ziya-batch"] + ([] if args.no_reference else ["reference"])
            for name in names:
                wait_idle()
                if name == "ziya-batch":
                    result = run_ziya(work, manifest, work / "images", actors, args)
                else:
                    result = run_reference(work, manifest, actors, args)
                print(result.line(args.batch), flush=True)
                results.append(result)
            if args.capacity:
                # The same pipelines around a model that takes no time: what the CPU side (read,
                # fetch, preprocess, Ray Data, the driver) delivers on this machine right now.
                for name in names:
                    wait_idle()
                    if name == "ziya-batch":
                        free = run_ziya(
                            work, manifest, work / "images", actors, args, tag="-free", sleep=0
                        )
                    else:
                        free = run_reference(work, manifest, actors, args, tag="-free", sleep=0)
                    capacity[f"{name}/{actors}"] = [free.rows_per_s, free.steady_rows_per_s]
                    steady = free.steady_rows_per_s
                    print(
                        f"  {name:<10} with a model taking no time: {free.rows_per_s:5.0f} "
                        f"rows/s end to end = {free.rows_per_s / bound:.2f} x the bound; "
                        + (
                            f"{steady:5.0f} in steady state = {steady / bound:.2f} x the bound"
                            if steady == steady  # not NaN
                            else "steady state too short to measure"
                        ),
                        flush=True,
                    )
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    [{"capacity_rows_per_s": capacity}]
                    + [
                        {
                            "name": r.name,
                            "actors": r.actors,
                            "rows": r.rows,
                            "wall_s": r.wall_s,
                            "fraction": r.fraction,
                            "steady_fraction": r.steady_fraction,
                            "first_batch_s": r.first_batch_s,
                            "ready_s": r.ready_s,
                            "busy": r.busy,
                            "partial_calls": r.partial(args.batch),
                            "mean_call_s": r.mean_call_s,
                        }
                        for r in results
                    ],
                    indent=1,
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
