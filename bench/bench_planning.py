"""Planning memory and time on a large manifest, before and after issue 15's rewrite, in one run.

    .venv/bin/python bench/bench_planning.py                   # after: 10 M and 100 M rows; before: 10 M
    .venv/bin/python bench/bench_planning.py --rows 1000000 --reference-rows 250000 --file-rows 250000
    .venv/bin/python bench/bench_planning.py --reference DIR   # "before" = a checkout of your own

What it measures: the driver's peak RSS growth and the wall time of planning a synthetic
manifest, each (tree, size) in a fresh subprocess whose imports of `pipeline` come from that
tree (see bench_driver_cpu.py for how the trees are chosen: `--reference`, default a worktree of
b07e379 at /tmp/ziya-ref, and `--tree`, default this checkout). Planning is
`pipeline.builder.prepare(job)` (file listing, schema and column checks, row counts, shard cuts;
before the rewrite it also reads every id and keeps a 64-bit hash of each), plus, in a tree that
has `pipeline.planning.ids.check_unique_ids`, the id-uniqueness check as remote tasks under a
local `ray.init` (all cores), unless `prepare` already checked them in-process (the plan's
`ids_checked`, which `run` looks at too; the table then says `in prepare`). A tree without it
plans with `prepare` alone, and the table says so. Each child first plans a 10,000-row manifest (untimed: lazy imports, first-use caches, Ray's
workers), then measures: RSS before (after `ray.init` where Ray is used), the high-water mark
reset there (/proc/self/clear_refs), and VmHWM after planning; growth = VmHWM - RSS before.

The manifest: `N` rows in Parquet files of `--file-rows` rows (default 5 M, row groups of 1 M),
columns `id` (string, unique) and `image` (an s3:// URI; nothing is fetched), written with
pyarrow in chunks of 1 M rows (no more in memory) and cached under
/tmp/ziya-bench-planning/rows-N-files-F/ (a `_complete` marker is written last), so a rerun skips
generation (100 M rows: ~1.4 GB of disk, ~2 minutes to generate here; 14 MB per 1 M rows). Shards: `--rows-per-shard`
(default 100,000: 1,000 shards at 100 M rows; with the default of 1,000 the plan itself would
hold 100,000 shard descriptors, a per-shard cost that the rewrite keeps).

The reference cannot plan 100 M rows in reasonable memory (~24 B per row), so it runs at
`--reference-rows` (default 10 M) and the new tree at both sizes: the same-size line gives the
ratio. Printed per run: rows, files, shards, prepare and id-check seconds, RSS before, peak
growth, growth per manifest row. Then the extrapolated planning memory and time at 1 B and 5 B
rows: from the line through the two sizes where a tree ran at two (fixed part + per row), else
proportional to the rows (per row x N). Issue 15's target: the new tree's growth <= 0.5 GB at
100 M rows. Exits non-zero when a child fails or plans a wrong number of rows; a missed target
is printed, not an error.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path("/tmp/ziya-bench-planning")
CHUNK = 1_000_000  # rows per generated chunk and row group
WARM_ROWS = 10_000
TARGET_BYTES = 0.5e9
GB = 1e9


def _status(key: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def child(tree: str, result: str, work: Path, manifest: str, warm: str) -> None:
    """In the subprocess: plan the warm-up manifest, then measure planning `manifest`."""
    sys.path.insert(0, tree)  # already first on PYTHONPATH (run_in_tree); made explicit
    # The editable install's finder would serve `pipeline.x` from the main checkout whenever
    # `tree` lacks it: drop it, so a module missing from `tree` stays missing.
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in f.__module__]
    import pipeline
    from pipeline.builder import prepare
    from pipeline.config import load_job

    try:
        from pipeline.planning.ids import check_unique_ids
    except ImportError:
        check_unique_ids = None
    if check_unique_ids is not None:
        from bench.common import init_ray

        init_ray()

    def check(ctx, job) -> None:
        # The planned signature is check_unique_ids(plan, job); the work in progress has
        # (plan, storage, ray=False). Call whichever this tree has, with Ray where it asks.
        params = inspect.signature(check_unique_ids).parameters
        second = job.storage if "storage" in params else job
        check_unique_ids(ctx.plan, second, **({"ray": True} if "ray" in params else {}))

    def plan(uri: str) -> tuple[object, float, float]:
        job = load_job(work / "job.json", [f"input.uri={uri}"])
        t0 = time.perf_counter()
        ctx = prepare(job)
        t1 = time.perf_counter()
        if check_unique_ids is not None and not getattr(ctx.plan, "ids_checked", False):
            check(ctx, job)  # as run() does: unless prepare() checked them in-process
        return ctx, t1 - t0, time.perf_counter() - t1

    plan(warm)
    gc.collect()
    before = _status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
        reset = True
    except OSError:
        reset = False  # VmHWM then counts from the start of the process: growth is an upper bound
    ctx, prepare_s, check_s = plan(manifest)
    out = {
        "rss_before": before,
        "growth": _status("VmHWM") - before,
        "peak_reset": reset,
        "prepare_s": prepare_s,
        "check_s": check_s,
        "id_check": (
            None
            if check_unique_ids is None
            else "prepare"
            if getattr(ctx.plan, "ids_checked", False)
            else "remote"
        ),
        "rows": ctx.plan.total_rows,
        "files": len(ctx.plan.files),
        "shards": len(ctx.plan.shards),
        "driver_pipeline": pipeline.__file__,
    }
    Path(result).write_text(json.dumps(out))


def manifest_dir(rows: int, file_rows: int) -> Path:
    """The cached manifest of `rows` rows in files of `file_rows` rows; generated if missing."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder = CACHE / f"rows-{rows}-files-{file_rows}"
    if (folder / "_complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    schema = pa.schema([("id", pa.string()), ("image", pa.string())])
    for number, first in enumerate(range(0, rows, file_rows)):
        last = min(rows, first + file_rows)
        with pq.ParquetWriter(folder / f"part-{number:05d}.parquet", schema) as writer:
            for lo in range(first, last, CHUNK):
                index = np.arange(lo, min(last, lo + CHUNK), dtype=np.int64)
                digits = pc.utf8_lpad(pc.cast(pa.array(index), pa.string()), 12, "0")
                bucket = pc.utf8_lpad(pc.cast(pa.array(index % 1000), pa.string()), 3, "0")
                ids = pc.binary_join_element_wise("id-", digits, "")
                uris = pc.binary_join_element_wise(
                    "s3://bench-images/", bucket, "/", digits, ".jpg", ""
                )
                table = pa.table({"id": ids, "image": uris}, schema=schema)
                writer.write_table(table, row_group_size=CHUNK)
    (folder / "_complete").write_text(f"{rows}\n")
    if rows > WARM_ROWS:
        print(f"  generated {rows:,} rows in {time.perf_counter() - t0:.0f} s: {folder}")
    return folder


def extrapolate(points: list[tuple[int, float]], rows: int) -> float:
    """The value at `rows`: on the line through the smallest and largest measured sizes (its
    slope at least 0), or proportional to the rows when one size was measured."""
    (n1, v1), (n2, v2) = min(points), max(points)
    if n1 == n2:
        return v2 * rows / n2
    return v2 + max(0.0, (v2 - v1) / (n2 - n1)) * (rows - n2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000_000, help="the new tree's large N")
    parser.add_argument("--reference-rows", type=int, default=10_000_000)
    parser.add_argument("--file-rows", type=int, default=5_000_000, help="rows per Parquet file")
    parser.add_argument("--rows-per-shard", type=int, default=100_000)
    parser.add_argument("--reference", help="the 'before' checkout (default: /tmp/ziya-ref)")
    parser.add_argument("--tree", default=str(REPO), help="the 'after' checkout")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--warm", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.result, Path(args.work), args.manifest, args.warm)
        return 0

    sys.path.insert(0, str(REPO))
    from bench.common import machine, reference_tree, run_in_tree, tiny_model, tree_label

    before_tree, after_tree = reference_tree(args.reference), Path(args.tree).resolve()
    runs = [("before", before_tree, args.reference_rows)]
    runs += [("after", after_tree, n) for n in sorted({args.reference_rows, args.rows})]
    work = Path(tempfile.mkdtemp(prefix="bench-planning-", dir="/tmp"))
    try:
        print(f"machine: {machine()}")
        visual, llm = tiny_model(work / "tiny")
        job = {
            "name": "bench-planning",
            "input": {"uri": "(set per run)"},
            "output": {"uri": str(work / "out"), "rows_per_shard": args.rows_per_shard},
            "model": {"visual": visual, "llm": llm},
            "limits": {"allowed_locations": ["s3://bench-images/"]},
        }
        (work / "job.json").write_text(json.dumps(job))
        warm = manifest_dir(WARM_ROWS, WARM_ROWS // 2)
        results = []
        for label, tree, rows in runs:
            folder = manifest_dir(rows, args.file_rows)
            res = run_in_tree(
                tree,
                __file__,
                ["--work", str(work), "--manifest", str(folder), "--warm", str(warm)],
                f"{label} at {rows:,} rows",
            )
            if not Path(res["driver_pipeline"]).resolve().is_relative_to(tree):
                raise SystemExit(f"{label}: pipeline came from {res['driver_pipeline']}")
            if res["rows"] != rows:
                raise SystemExit(f"{label}: planned {res['rows']:,} rows of {rows:,}")
            results.append((label, tree, res))

        print(
            f"planning = prepare(job) + check_unique_ids under ray.init where the tree has it; "
            f"rows_per_shard {args.rows_per_shard:,}, files of {args.file_rows:,} rows"
        )
        print(
            f"  {'':<7}{'tree':<17}{'rows':>13}{'files':>6}{'shards':>8}{'prepare s':>10}"
            f"{'id check s':>11}{'total s':>9}{'RSS before':>12}{'growth':>10}{'B/row':>7}"
        )
        for label, tree, r in results:
            check = {"remote": f"{r['check_s']:>11.1f}", "prepare": f"{'in prepare':>11}"}.get(
                r["id_check"], f"{'(none)':>11}"
            )
            print(
                f"  {label:<7}{tree_label(tree):<17}{r['rows']:>13,}{r['files']:>6}"
                f"{r['shards']:>8,}{r['prepare_s']:>10.1f}{check}"
                f"{r['prepare_s'] + r['check_s']:>9.1f}{r['rss_before'] / 2**20:>8.0f} MiB"
                f"{r['growth'] / 2**20:>6.0f} MiB{r['growth'] / r['rows']:>7.1f}"
            )
        if not all(r["id_check"] for label, _, r in results if label == "after"):
            print(
                "  note: the after tree has no pipeline.planning.ids.check_unique_ids: it planned "
                "with prepare() alone"
            )
        if not all(r["peak_reset"] for _, _, r in results):
            print("  note: VmHWM could not be reset: growth counts from the process start")
        print("extrapolated planning cost (driver RSS growth, wall time):")
        for label in ("before", "after"):
            mine = [r for lab, _, r in results if lab == label]
            # Only sizes planned the same way as the largest (a size small enough for prepare()
            # to check the ids in-process is not on the remote check's line).
            largest = max(mine, key=lambda r: r["rows"])
            mine = [r for r in mine if r["id_check"] == largest["id_check"]]
            how = "line through 2 sizes" if len(mine) > 1 else "proportional to rows"
            mem = [(r["rows"], r["growth"]) for r in mine]
            secs = [(r["rows"], r["prepare_s"] + r["check_s"]) for r in mine]
            print(
                f"  {label:<7}"
                + "; ".join(
                    f"{n / 1e9:.0f} B rows: {extrapolate(mem, n) / GB:7.1f} GB, "
                    f"{extrapolate(secs, n) / 60:6.1f} min"
                    for n in (1_000_000_000, 5_000_000_000)
                )
                + f"  ({how})"
            )
        same = {lab: r for lab, _, r in results if r["rows"] == args.reference_rows}
        b, a = same["before"], same["after"]
        total = (b["prepare_s"] + b["check_s"]) / max(a["prepare_s"] + a["check_s"], 1e-9)
        print(
            f"same size ({args.reference_rows:,} rows), before / after: RSS growth "
            f"{b['growth'] / max(a['growth'], 1):.1f}x, wall time {total:.2f}x"
        )
        big = max((r for lab, _, r in results if lab == "after"), key=lambda r: r["rows"])
        print(
            f"after at {big['rows']:,} rows: growth {big['growth'] / GB:.2f} GB (target <= "
            f"{TARGET_BYTES / GB:.1f} GB at 100,000,000 rows): "
            + ("met" if big["growth"] <= TARGET_BYTES else "not met")
            + ("" if big["rows"] >= 100_000_000 else " at this size (not the target's)")
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
