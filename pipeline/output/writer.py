"""Stage 5, write: the driver collects answer rows per shard and commits each complete shard once.

Input columns: the infer stage's output (shard, row, id, question_index, question, answer,
               status, error, num_tokens, mean_logprob, latency_s, row_key, image_identity)
Output:        committed shards in the output layout (pipeline/output/layout.py)

Exactly once: Ray Data retries tasks and restarts actors, so a row may arrive twice; the first
copy of each (row, question_index) wins. A shard is committed when every one of its manifest
rows has arrived, after joining the manifest's own columns back on (read again from the
manifest, so their types pass through untouched). Commits run on a small thread pool so the
driver keeps consuming the stream while a shard uploads.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.columns import FAILURE_STATUSES, INFERENCE_ERROR, UNCHANGED, check_columns
from pipeline.config import JobConfig
from pipeline.output import layout
from pipeline.planning.manifest import Shard, read_rows

INPUT_COLUMNS = {
    "shard": "shard id",
    "row": "manifest row index",
    "question_index": "index of the question within the row",
    "status": "row status",
}

# Columns the pipeline adds to every output row, after the manifest's pass-through columns.
OUTPUT_COLUMNS = (
    "task",
    "question_index",
    "question",
    "answer",
    "status",
    "error",
    "num_tokens",
    "mean_logprob",
    "latency_s",
    "model",
    "generation",
    "row_key",
    "image_identity",
    "manifest_row",
)


class JobAborted(RuntimeError):
    """Too many rows failed: the job stops instead of burning GPU hours on bad input."""


@dataclass
class _OpenShard:
    shard: Shard
    tables: list[pa.Table] = field(default_factory=list)
    seen: set[tuple[int, int]] = field(default_factory=set)
    rows: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.time)


@dataclass
class Tally:
    """What this run committed, for the summary and the progress line."""

    rows_in: int = 0  # manifest rows committed
    rows_out: int = 0  # output rows written
    statuses: Counter = field(default_factory=Counter)
    tokens: int = 0
    shards: int = 0
    failures_seen: int = 0  # failed answer rows seen in the stream (committed or not)
    rows_seen: int = 0  # answer rows seen in the stream (one per question)
    rows_arrived: int = 0  # manifest rows whose answers reached the driver (committed or not)


class ShardCommitter:
    def __init__(
        self,
        job: JobConfig,
        out_uri: str,
        shards: list[Shard],
        passthrough: list[str],
        model: str,
        metrics=None,
        replace: dict[str, pa.Table] | None = None,
    ):
        self.job = job
        self.out_uri = out_uri
        self.expected = {s.shard_id: s for s in shards}
        self.passthrough = passthrough
        self.model = model
        self.generation = job.generation.as_json()
        self.metrics = metrics
        # retry_failed mode: the committed table each partial shard's new rows are merged into.
        self.replace = replace or {}
        self.open: dict[str, _OpenShard] = {}
        self.done: set[str] = set()
        self.tally = Tally()
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="commit")
        self.pending: list[Future] = []
        self.lock = threading.Lock()

    def add(self, batch: pa.Table) -> None:
        """Take one batch of answer rows from the stream."""
        if batch.num_rows == 0:
            return
        check_columns("ShardCommitter", batch, INPUT_COLUMNS)
        self._raise_commit_errors()
        for sid in pc.unique(batch.column("shard")).to_pylist():
            if sid in self.done or sid not in self.expected:
                continue  # a retried task's duplicate of a committed shard
            part = batch.filter(pc.equal(batch.column("shard"), sid))
            state = self.open.setdefault(sid, _OpenShard(self.expected[sid]))
            keep = []
            for i, (r, q) in enumerate(
                zip(
                    part.column("row").to_pylist(),
                    part.column("question_index").to_pylist(),
                    strict=True,
                )
            ):
                if (r, q) not in state.seen:
                    state.seen.add((r, q))
                    if r not in state.rows:
                        state.rows.add(r)
                        self.tally.rows_arrived += 1
                    keep.append(i)
            if keep:
                part = part.take(keep)
                state.tables.append(part)
                self._count(part)
            if len(state.rows) == state.shard.num_rows:
                self._commit(sid)

    def _count(self, part: pa.Table) -> None:
        statuses = part.column("status").to_pylist()
        self.tally.rows_seen += len(statuses)
        self.tally.failures_seen += sum(s in FAILURE_STATUSES for s in statuses)
        rate = self.tally.failures_seen / self.tally.rows_seen
        if (
            self.tally.rows_seen >= self.job.run.min_rows_before_abort
            and rate > self.job.run.max_failure_rate
        ):
            example = part.filter(
                pc.is_in(part.column("status"), pa.array(FAILURE_STATUSES))
            ).slice(0, 1)
            row = example.to_pylist()[0] if example.num_rows else {}
            raise JobAborted(
                f"aborting: {self.tally.failures_seen} of {self.tally.rows_seen} rows failed "
                f"({rate:.0%} > run.max_failure_rate {self.job.run.max_failure_rate:.0%}); "
                f"e.g. id {row.get('id')!r}: {row.get('status')}: {row.get('error')}"
            )

    def _commit(self, sid: str) -> None:
        state = self.open.pop(sid)
        self.done.add(sid)
        self.pending.append(self.pool.submit(self._write, state))

    def _write(self, state: _OpenShard) -> None:
        shard = state.shard
        answers = pa.concat_tables(state.tables, promote_options="permissive").sort_by(
            [("row", "ascending"), ("question_index", "ascending")]
        )
        manifest = read_rows(shard, self.job.storage, columns=self.passthrough)
        index = {r: i for i, r in enumerate(manifest.column("row").to_pylist())}
        positions = pa.array([index[r] for r in answers.column("row").to_pylist()], pa.int64())
        joined = manifest.drop_columns(["row"]).take(positions)
        n = answers.num_rows
        extra = {
            "task": pa.array([self.job.task.kind] * n, pa.string()),
            "question_index": answers.column("question_index"),
            "question": answers.column("question"),
            "answer": answers.column("answer"),
            "status": answers.column("status"),
            "error": answers.column("error"),
            "num_tokens": answers.column("num_tokens"),
            "mean_logprob": answers.column("mean_logprob"),
            "latency_s": answers.column("latency_s"),
            "model": pa.array([self.model] * n, pa.string()),
            "generation": pa.array([self.generation] * n, pa.string()),
            "row_key": answers.column("row_key"),
            "image_identity": answers.column("image_identity"),
            "manifest_row": answers.column("row"),
        }
        if "id" not in joined.column_names:
            joined = joined.append_column("id", answers.column("id"))
        for name in OUTPUT_COLUMNS:
            joined = joined.append_column(name, extra[name])
        # Incremental runs skip rows labeled identically before: they are not written again.
        table = joined.filter(pc.not_equal(joined.column("status"), UNCHANGED))
        # The run's tally counts the rows this run wrote; the stats file describes the shard
        # (in retry_failed mode: the rows kept from before, too).
        new_rows, new_statuses = table.num_rows, Counter(table.column("status").to_pylist())
        new_tokens = int(pc.sum(table.column("num_tokens")).as_py() or 0)
        table = self._merge_retry(shard, table)
        order = ["id"] + [c for c in table.column_names if c != "id"]
        table = table.select(order)
        statuses = Counter(table.column("status").to_pylist())
        tokens = int(pc.sum(table.column("num_tokens")).as_py() or 0)
        latencies = sorted(set(answers.column("latency_s").to_pylist()))
        stats = {
            "shard": shard.shard_id,
            "manifest": shard.path,
            "row_start": shard.start,
            "row_end": shard.end,
            "rows": table.num_rows,
            "input_rows": shard.end - shard.start,
            "statuses": dict(statuses),
            "tokens": tokens,
            "duration_s": round(time.time() - state.started, 3),
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "batch_latency_s": [round(x, 4) for x in latencies],
        }
        layout.commit_shard(self.out_uri, shard.shard_id, table, stats, self.job.storage)
        with self.lock:
            t = self.tally
            t.rows_in += shard.num_rows
            t.rows_out += new_rows
            t.statuses.update(new_statuses)
            t.tokens += new_tokens
            t.shards += 1
        if self.metrics is not None:
            self.metrics.shard_committed(dict(new_statuses), new_tokens)

    def _merge_retry(self, shard: Shard, table: pa.Table) -> pa.Table:
        """retry_failed: put the new rows in place of the old failed ones, one row per key."""
        old = self.replace.get(shard.shard_id)
        if old is None:
            return table
        redone = set(table.column("manifest_row").to_pylist())
        kept = old.filter(
            pc.invert(pc.is_in(old.column("manifest_row"), pa.array(sorted(redone), pa.int64())))
        )
        merged = pa.concat_tables(
            [kept, table.select(kept.column_names)], promote_options="permissive"
        )
        return merged.sort_by([("manifest_row", "ascending"), ("question_index", "ascending")])

    def missing(self) -> dict[str, list[int]]:
        """Manifest rows of this run's uncommitted shards that have not arrived, by shard."""
        out = {}
        for sid, shard in self.expected.items():
            if sid in self.done:
                continue
            arrived = self.open[sid].rows if sid in self.open else set()
            rows = shard.rows if shard.rows is not None else range(shard.start, shard.end)
            left = [r for r in rows if r not in arrived]
            if left:
                out[sid] = left
        return out

    def finish(self) -> list[str]:
        """Rows that never arrived (their batch crashed its worker every time) are committed as
        `inference_error`, so every input row is in the output; returns the affected shards."""
        filled = []
        for sid, state in list(self.open.items()) + [
            (s, _OpenShard(self.expected[s]))
            for s in self.expected
            if s not in self.open and s not in self.done
        ]:
            missing = self._missing_rows(state)
            if missing is None:
                continue
            state.tables.append(missing)
            self.open[sid] = state
            self._count(missing)
            self._commit(sid)
            filled.append(sid)
        for f in self.pending:
            f.result()
        self.pool.shutdown()
        return filled

    def _missing_rows(self, state: _OpenShard) -> pa.Table | None:
        shard = state.shard
        rows = shard.rows if shard.rows is not None else range(shard.start, shard.end)
        missing = [r for r in rows if r not in state.rows]
        if not missing:
            return None
        ids = read_rows(
            shard, self.job.storage, columns=["id"], mapping=dict(self.job.input.columns)
        )
        id_of = dict(zip(ids.column("row").to_pylist(), ids.column("id").to_pylist(), strict=True))
        n = len(missing)
        return pa.table(
            {
                "shard": [shard.shard_id] * n,
                "row": pa.array(missing, pa.int64()),
                "id": [id_of[r] for r in missing],
                "question_index": pa.array([0] * n, pa.int32()),
                "question": pa.array([None] * n, pa.string()),
                "answer": pa.array([None] * n, pa.string()),
                "status": [INFERENCE_ERROR] * n,
                "error": [
                    "the batch holding this row failed on every retry (worker crash, or a "
                    "model call hung past run.batch_timeout_s)"
                ]
                * n,
                "num_tokens": pa.array([0] * n, pa.int32()),
                "mean_logprob": pa.array([None] * n, pa.float32()),
                "latency_s": pa.array([0.0] * n, pa.float32()),
                "row_key": pa.array([None] * n, pa.string()),
                "image_identity": pa.array([None] * n, pa.string()),
            }
        )

    def _raise_commit_errors(self) -> None:
        still = []
        for f in self.pending:
            if f.done():
                f.result()  # re-raises a failed upload in the driver
            else:
                still.append(f)
        self.pending = still
