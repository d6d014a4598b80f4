"""The driver's own work per output row on the commit path, before and after issue 15, in one run.

    .venv/bin/python bench/bench_commit_driver.py                 # 100,000 rows, 2 questions each
    .venv/bin/python bench/bench_commit_driver.py --rows 20000

What it measures, without Ray (so nothing but the code under test runs in the process):
  before  b07e379's `ShardCommitter`: the driver takes every answer row from the stream,
          deduplicates it in Python, joins the manifest's columns and encodes and writes each
          shard (on its commit threads: still the driver process). Timed: `add` of every answer
          batch + `finish`, process CPU (all threads).
  after   this tree's `CommitTracker`: the driver takes one report per staged file (the rows'
          indices and counts, stages/write.py) and hands complete shards to commit tasks. Timed:
          `add` of every report + the hand-off; the write stage and the commit tasks run on the
          cluster in the pipeline, so they are run here untimed (the reports are made first; the
          commit tasks are not run at all).
Same manifest (rows with a 200-character pass-through text column), same answer rows (answers
of ~120 characters, `--questions` per row, batches of `--batch` rows with one retried duplicate
batch in ten), same shards. Printed: driver CPU µs per output row for each, the ratio, and the
bytes that reach the driver per output row (Arrow buffers of what `add` is given).

This is the pipeline's own share of the driver. The driver also runs Ray Data's streaming
executor, whose cost is per task and block, not per row, and is the same for both trees: see
bench_driver_cpu.py for the whole driver process in a real run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _answers(shard_id: str, rows: list[int], questions: int):
    import pyarrow as pa

    n = len(rows) * questions
    return pa.table(
        {
            "shard": [shard_id] * n,
            "row": pa.array([r for r in rows for _ in range(questions)], pa.int64()),
            "id": [f"row-{r:09d}" for r in rows for _ in range(questions)],
            "question_index": pa.array(list(range(questions)) * len(rows), pa.int32()),
            "question": ["What is in the picture? Describe it in detail."] * n,
            "answer": [
                f"A photograph of a small blue square, item {i}, " + "x" * 80 for i in range(n)
            ],
            "status": ["ok"] * n,
            "error": pa.nulls(n, pa.string()),
            "num_tokens": pa.array([40] * n, pa.int32()),
            "mean_logprob": pa.array([-0.3] * n, pa.float32()),
            "latency_s": pa.array([0.5] * n, pa.float32()),
            "row_key": ["0123456789abcdef"] * n,
            "image_identity": ["sha1:0123456789abcdef0123456789abcdef01234567"] * n,
        }
    )


def _batches(plan, batch: int, questions: int):
    """Answer batches in stream order: `batch` manifest rows each, every tenth sent twice."""
    out = []
    for s in plan.shards:
        for start in range(s.start, s.end, batch):
            rows = list(range(start, min(s.end, start + batch)))
            out.append(_answers(s.shard_id, rows, questions))
            if len(out) % 10 == 0:
                out.append(out[-1])  # a retried task's duplicate
    return out


def child(tree: str, result: str, work: Path, batch: int, questions: int) -> None:
    sys.path.insert(0, tree)
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in f.__module__]
    import pyarrow as pa

    from pipeline.config import load_job

    job = load_job(work / "job.json", [f"output.uri={work / ('out-' + Path(tree).name)}"])
    try:
        from pipeline.planning.manifest import plan
    except ImportError:  # before the folder regroup
        from pipeline.manifest import plan
    p = plan(job)
    batches = _batches(p, batch, questions)
    rows_out = p.total_rows * questions
    try:
        from pipeline.output.commit import CommitSettings, CommitTracker
        from pipeline.output.layout import staging_root
        from pipeline.stages.write import WriteStage
    except ImportError:
        CommitTracker = None
    if CommitTracker is None:
        from pipeline.writer import ShardCommitter

        committer = ShardCommitter(job, job.output.uri, p.shards, p.passthrough_columns, "m")
        received = sum(b.nbytes for b in batches)
        cpu0 = time.process_time()
        for b in batches:
            committer.add(b)
        committer.finish()
        cpu = time.process_time() - cpu0
    else:

        class DriverOnly(CommitTracker):
            """The tracker with its commit tasks left out (they run on the cluster)."""

            def _start(self) -> None:
                self.queued.clear()

        staging = staging_root(job.output.uri)
        settings = CommitSettings(
            job.output.uri, staging, job.storage, "caption", "m", "{}", (), {}, "bench"
        )
        stage = WriteStage(staging, job.storage)
        reports = [stage(b) for b in batches]  # on the cluster's CPU tasks in the pipeline
        received = sum(r.nbytes for r in reports)
        tracker = DriverOnly(settings, p.shards, remote=False)
        cpu0 = time.process_time()
        for r in reports:
            tracker.add(r)
        cpu = time.process_time() - cpu0
        assert tracker.tally.rows_arrived == p.total_rows and not tracker.open
    del pa
    Path(result).write_text(json.dumps({"cpu_s": cpu, "rows_out": rows_out, "bytes": received}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--rows-per-shard", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256, help="manifest rows per answer batch")
    parser.add_argument("--reference", help="the 'before' checkout (default: /tmp/ziya-ref)")
    parser.add_argument("--tree", default=str(REPO), help="the 'after' checkout")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.result, Path(args.work), args.batch, args.questions)
        return 0

    sys.path.insert(0, str(REPO))
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.common import machine, reference_tree, run_in_tree, tree_label

    trees = [("before", reference_tree(args.reference)), ("after", Path(args.tree).resolve())]
    work = Path(tempfile.mkdtemp(prefix="bench-commit-driver-", dir="/tmp"))
    ids = [f"row-{i:09d}" for i in range(args.rows)]
    pq.write_table(
        pa.table(
            {"id": ids, "image": [f"/img/{i}.jpg" for i in ids], "note": ["n" * 200] * args.rows}
        ),
        work / "manifest.parquet",
        row_group_size=args.rows_per_shard,
    )
    (work / "job.json").write_text(
        json.dumps(
            {
                "input": {"uri": str(work / "manifest.parquet")},
                "output": {"uri": str(work / "out"), "rows_per_shard": args.rows_per_shard},
                "model": {"visual": "/m/visual", "llm": "/m/llm"},
            }
        )
    )
    print(f"machine: {machine()}")
    print(
        f"{args.rows:,} manifest rows x {args.questions} questions, {args.rows_per_shard} rows per "
        f"shard, answer batches of {args.batch} rows (one in ten duplicated)"
    )
    print(f"{'':8}{'tree':18}{'out rows':>10}{'CPU s':>8}{'µs/row':>9}{'B/row to driver':>17}")
    got = {}
    for name, tree in trees:
        r = run_in_tree(
            tree,
            str(REPO / "bench" / "bench_commit_driver.py"),
            ["--work", str(work), "--batch", str(args.batch), "--questions", str(args.questions)],
            name,
        )
        got[name] = r
        us = 1e6 * r["cpu_s"] / r["rows_out"]
        print(
            f"  {name:6}{tree_label(tree):18}{r['rows_out']:>10,}{r['cpu_s']:>8.2f}{us:>9.2f}"
            f"{r['bytes'] / r['rows_out']:>17.1f}"
        )
    ratio = got["before"]["cpu_s"] / max(got["after"]["cpu_s"], 1e-9)
    ratio_b = got["before"]["bytes"] / max(got["after"]["bytes"], 1)
    print(f"driver's own commit work per row, before / after: {ratio:.1f}x; bytes: {ratio_b:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
