"""Stage 6, commit: shards complete in the driver's tally are committed by committer actors.

Input: the write stage's reports (shard, file, rows, answers, failures), one per staged file
Output: committed shards in the output layout (pipeline/output/layout.py)

Exactly once: Ray Data retries tasks and restarts actors, so a row may be staged twice. The
driver keeps, per open shard, one bit per manifest row (has it arrived?) and the list of its
staged files; when every row of a shard has arrived it hands the file list to `commit_shard` on
a committer actor (one per 8 model actors, zero CPUs, a few commits at once), and forgets the
shard. That task reads the staged rows, keeps the first copy of
each (row, question_index), joins the manifest's own columns from its slice of the manifest
(read again, so their types pass through untouched), writes the shard's stats and then its rows
(the commit), and deletes its staging. The driver's work per block is a few numpy operations
on the report, whatever the rows hold; its memory is a bit per row of the open shards.

Rows that never arrive (their batch crashed its worker on every retry) are listed by `missing`
for a retry one row per batch; whatever is still missing at `finish` is committed as
`inference_error`, so every input row is in the output.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.columns import (
    ANSWER_SCHEMA,
    INFERENCE_ERROR,
    OUTPUT_FIELDS,
    UNCHANGED,
    check_columns,
)
from pipeline.config import StorageConfig
from pipeline.output import layout
from pipeline.planning.manifest import ID, Shard, read_rows
from pipeline.storage import filesystem

INPUT_COLUMNS = {
    "shard": "shard id",
    "file": "staged file URI",
    "rows": "manifest rows in the file",
    "answers": "answer rows per manifest row",
    "failures": "failed answer rows per manifest row",
}
# Complete shards beyond what the committers run at once wait in the driver (a shard id and its
# file list each).
MAX_COMMITTING = 4  # commits at once per committer actor (threads: Parquet I/O frees the GIL)
_ROW_MISSING_ERROR = (
    "the batch holding this row failed on every retry (worker crash, or a model call hung past "
    "run.batch_timeout_s)"
)


class JobAborted(RuntimeError):
    """Too many rows failed: the job stops instead of burning GPU hours on bad input."""


@dataclass(frozen=True)
class CommitSettings:
    """What a commit task needs of the job (not the whole job)."""

    out_uri: str  # where the shards go: OUT, or OUT/runs/<run_id>
    staging: str  # where the write stage staged their rows (layout.staging_root)
    storage: StorageConfig
    task: str  # caption | vqa
    model: str  # model identity written to every row
    generation: str  # generation settings as JSON, written to every row
    passthrough: tuple[str, ...]  # manifest columns copied to the output, the file's own names
    mapping: dict[str, str]  # input.columns (role -> the file's column), to read the ids
    attempt: str  # this invocation: a retried commit task finds its own finished commit by it


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
    rows_arrived: int = 0  # manifest rows whose answers were staged (committed or not)


@dataclass
class _Open:
    shard: Shard
    arrived: np.ndarray  # one bool per row of the shard (per listed row of a partial shard)
    files: list[str] = field(default_factory=list)
    count: int = 0

    def positions(self, rows: np.ndarray) -> np.ndarray:
        if self.shard.rows is None:
            return rows - self.shard.start
        return np.searchsorted(np.asarray(self.shard.rows, dtype=np.int64), rows)

    def missing(self) -> list[int]:
        rows = (
            self.shard.rows
            if self.shard.rows is not None
            else range(self.shard.start, self.shard.end)
        )
        return [int(r) for r, got in zip(rows, self.arrived, strict=True) if not got]


class CommitTracker:
    """The driver's side: tallies the write stage's reports, starts a commit task per complete
    shard, and raises `JobAborted` past the failure threshold."""

    def __init__(
        self,
        settings: CommitSettings,
        shards: list[Shard],
        merge: frozenset[str] = frozenset(),
        max_failure_rate: float = 1.0,
        min_rows_before_abort: int = 1,
        metrics: Any = None,
        remote: bool = True,
        committers: int = 1,
    ):
        self.settings = settings
        # remote=False commits in the calling process, one shard at a time (unit tests, tools
        # without Ray); the pipeline always commits with remote tasks.
        self.remote = remote
        self.expected = {s.shard_id: s for s in shards}
        self.merge = merge  # retry_failed: shards whose committed rows the new ones replace
        self.max_failure_rate = max_failure_rate
        self.min_rows_before_abort = min_rows_before_abort
        self.metrics = metrics
        self.open: dict[str, _Open] = {}
        self.done: set[str] = set()
        self.queued: list[tuple[Shard, list[str], bool]] = []
        self.running: dict[Any, str] = {}  # commit task ref -> shard id
        self.tally = Tally()
        # Commits run on a few long-lived committer actors, not as tasks: a zero-CPU task would
        # mostly start a fresh worker process (Ray ends idle workers beyond the CPU count within
        # a second), and that start-up costs more CPU than the commit itself.
        self.committers = committers
        self._committers: list | None = None
        self._next = 0
        self.example: str | None = None  # a failed row seen, for the abort message

    def _state(self, sid: str) -> _Open:
        state = self.open.get(sid)
        if state is None:
            shard = self.expected[sid]
            state = self.open[sid] = _Open(shard, np.zeros(shard.num_rows, dtype=bool))
        return state

    def add(self, reports: pa.Table) -> None:
        """Take one batch of the write stage's reports."""
        self._collect(block=False)
        if reports.num_rows == 0:
            return
        check_columns("CommitTracker", reports, INPUT_COLUMNS)
        cols = {c: reports.column(c).combine_chunks() for c in ("rows", "answers", "failures")}
        # The three lists have the same length per report: one offset array for all of them
        # (relative, since a column may be a slice of a larger one).
        offsets = cols["rows"].offsets.to_numpy()
        offsets = offsets - offsets[0]
        rows_all = cols["rows"].flatten().to_numpy()
        answers_all = cols["answers"].flatten().to_numpy()
        failures_all = cols["failures"].flatten().to_numpy()
        examples = reports.column("example").to_pylist()
        for i, (sid, file) in enumerate(
            zip(
                reports.column("shard").to_pylist(), reports.column("file").to_pylist(), strict=True
            )
        ):
            if sid in self.done or sid not in self.expected:
                continue  # a retried task's copy of a committed shard's rows
            lo, hi = offsets[i], offsets[i + 1]
            state = self._state(sid)
            pos = state.positions(rows_all[lo:hi])
            new = ~state.arrived[pos]
            state.files.append(file)
            if new.any():
                state.arrived[pos[new]] = True
                n_new = int(new.sum())
                state.count += n_new
                self.tally.rows_arrived += n_new
                self.example = examples[i] or self.example
                self._count(int(answers_all[lo:hi][new].sum()), int(failures_all[lo:hi][new].sum()))
            if state.count == len(state.arrived):
                self._commit(sid, fill=False)

    def _count(self, answers: int, failures: int) -> None:
        t = self.tally
        t.rows_seen += answers
        t.failures_seen += failures
        if (
            t.rows_seen >= self.min_rows_before_abort
            and t.failures_seen > self.max_failure_rate * t.rows_seen
        ):
            raise JobAborted(
                f"aborting: {t.failures_seen} of {t.rows_seen} rows failed "
                f"({t.failures_seen / t.rows_seen:.0%} > run.max_failure_rate "
                f"{self.max_failure_rate:.0%}); e.g. {self.example}"
            )

    def _commit(self, sid: str, fill: bool) -> None:
        state = self.open.pop(sid)
        self.done.add(sid)
        self.queued.append((state.shard, state.files, fill))
        self._start()

    def _start(self) -> None:
        if not self.remote:
            while self.queued:
                shard, files, fill = self.queued.pop(0)
                self._tally(
                    commit_shard(self.settings, shard, files, shard.shard_id in self.merge, fill)
                )
            return

        if self._committers is None:
            self._committers = _start_committers(self.committers)
        while self.queued and len(self.running) < MAX_COMMITTING * len(self._committers):
            shard, files, fill = self.queued.pop(0)
            committer = self._committers[self._next % len(self._committers)]
            self._next += 1
            merge = shard.shard_id in self.merge
            ref = committer.commit.remote(self.settings, shard, files, merge, fill)
            self.running[ref] = shard.shard_id

    def close(self) -> None:
        """Stop the committer actors (after `finish`, or when the run stops early)."""
        import ray

        for actor in self._committers or []:
            ray.kill(actor)
        self._committers = None

    def _collect(self, block: bool) -> None:
        """Tally finished commit tasks; a failed one raises here, in the driver."""
        if not self.running:
            return
        import ray

        while self.running:
            ready, _ = ray.wait(list(self.running), num_returns=1, timeout=None if block else 0)
            if not ready:
                return
            ref = ready[0]
            self.running.pop(ref)
            self._tally(ray.get(ref))
            self._start()

    def _tally(self, result: dict) -> None:
        t = self.tally
        t.rows_in += result["rows_in"]
        t.rows_out += result["rows_out"]
        t.statuses.update(result["new_statuses"])
        t.tokens += result["new_tokens"]
        t.shards += 1
        if self.metrics is not None:
            self.metrics.shard_committed(result["new_statuses"], result["new_tokens"])

    def missing(self) -> dict[str, list[int]]:
        """Manifest rows of this run's uncommitted shards that have not arrived, by shard."""
        out = {}
        for sid in self.expected:
            if sid in self.done:
                continue
            left = self._state(sid).missing()
            if left:
                out[sid] = left
        return out

    def finish(self) -> list[str]:
        """Commit every shard still open, rows that never arrived as `inference_error`; wait for
        every commit task. Returns the shards that had rows filled."""
        filled = [sid for sid in self.expected if sid not in self.done]
        for sid in filled:
            self._state(sid)
            self._commit(sid, fill=True)
        while self.running or self.queued:
            self._collect(block=True)
        return filled


def commit_shard(
    settings: CommitSettings, shard: Shard, files: list[str], merge: bool, fill: bool
) -> dict:
    """Build one shard's output table from its staged rows and commit it (a remote task).

    Returns the shard's stats plus what this commit added (`rows_in`, `rows_out`,
    `new_statuses`, `new_tokens`) for the driver's tally.
    """
    stats_uri = layout.stats_uri(settings.out_uri, shard.shard_id)
    if layout.exists(layout.shard_uri(settings.out_uri, shard.shard_id), settings.storage):
        # A retry of this task after it committed (its worker died before returning).
        fs, path = filesystem(stats_uri, settings.storage)
        stats = json.loads(fs.cat_file(path))
        if stats.get("attempt") == settings.attempt and "result" in stats:
            return {**stats, **stats["result"]}
    t0 = time.time()
    answers = _staged_rows(settings, files)
    if fill:
        answers = _fill_missing(settings, shard, answers)
    table = _join_manifest(settings, shard, answers)
    # Incremental runs skip rows labeled identically before: they are not written again.
    table = table.filter(pc.not_equal(table.column("status"), UNCHANGED))
    result = {
        "rows_in": shard.num_rows,
        "rows_out": table.num_rows,
        "new_statuses": dict(Counter(table.column("status").to_pylist())),
        "new_tokens": int(pc.sum(table.column("num_tokens")).as_py() or 0),
    }
    if merge:
        table = _merge_retry(settings, shard, table)
    latencies = np.unique(answers.column("latency_s").to_numpy(zero_copy_only=False))
    stats = {
        "shard": shard.shard_id,
        "manifest": shard.path,
        "row_start": shard.start,
        "row_end": shard.end,
        "rows": table.num_rows,
        "input_rows": shard.end - shard.start,
        "statuses": dict(Counter(table.column("status").to_pylist())),
        "tokens": int(pc.sum(table.column("num_tokens")).as_py() or 0),
        "duration_s": round(time.time() - t0, 3),
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "batch_latency_s": [round(float(x), 4) for x in latencies if x == x],
        "attempt": settings.attempt,
        "result": result,
    }
    layout.commit_shard(settings.out_uri, shard.shard_id, table, stats, settings.storage)
    layout.remove_tree(layout.staging_uri(settings.staging, shard.shard_id), settings.storage)
    return {**stats, **result}


def _staged_rows(settings: CommitSettings, files: list[str]) -> pa.Table:
    """The staged answer rows, one per (row, question_index) (the first copy), sorted."""
    schema = ANSWER_SCHEMA.remove(0)  # staged without `shard`
    tables = []
    for uri in files:
        fs, path = filesystem(uri, settings.storage)
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, schema=schema))
    if not tables:
        return schema.empty_table()
    staged = pa.concat_tables(tables)
    key = staged.column("row").to_numpy() * 65536 + staged.column("question_index").to_numpy()
    _, first = np.unique(key, return_index=True)  # sorted by key: by row, then question
    return staged.take(first)


def _fill_missing(settings: CommitSettings, shard: Shard, answers: pa.Table) -> pa.Table:
    rows = np.asarray(shard.rows if shard.rows is not None else range(shard.start, shard.end))
    missing = np.setdiff1d(rows, answers.column("row").to_numpy())
    if not len(missing):
        return answers
    ids = read_rows(shard, settings.storage, columns=[ID], mapping=dict(settings.mapping))
    id_of = dict(zip(ids.column("row").to_pylist(), ids.column(ID).to_pylist(), strict=True))
    n = len(missing)
    filled = pa.table(
        {
            "row": pa.array(missing, pa.int64()),
            "id": [id_of[int(r)] for r in missing],
            "question_index": pa.array([0] * n, pa.int32()),
            "question": pa.nulls(n, pa.string()),
            "answer": pa.nulls(n, pa.string()),
            "status": [INFERENCE_ERROR] * n,
            "error": [_ROW_MISSING_ERROR] * n,
            "num_tokens": pa.array([0] * n, pa.int32()),
            "mean_logprob": pa.nulls(n, pa.float32()),
            "latency_s": pa.array([0.0] * n, pa.float32()),
            "row_key": pa.nulls(n, pa.string()),
            "image_identity": pa.nulls(n, pa.string()),
        },
        schema=answers.schema,
    )
    return pa.concat_tables([answers, filled]).sort_by(
        [("row", "ascending"), ("question_index", "ascending")]
    )


def _join_manifest(settings: CommitSettings, shard: Shard, answers: pa.Table) -> pa.Table:
    """id, the manifest's pass-through columns, then the output columns (columns.OUTPUT_FIELDS)."""
    manifest = read_rows(shard, settings.storage, columns=list(settings.passthrough))
    positions = np.searchsorted(manifest.column("row").to_numpy(), answers.column("row").to_numpy())
    table = manifest.drop_columns(["row"]).take(pa.array(positions, pa.int64()))
    n = answers.num_rows
    constant = {
        "task": settings.task,
        "model": settings.model,
        "generation": settings.generation,
    }
    columns = {"id": answers.column("id")}
    for name, type_, _ in OUTPUT_FIELDS:
        if name in constant:
            columns[name] = pa.array([constant[name]] * n, type_)
        elif name == "manifest_row":
            columns[name] = answers.column("row")
        else:
            columns[name] = answers.column(name).cast(type_)
    out = pa.table({"id": columns.pop("id")})
    for name in table.column_names:
        out = out.append_column(name, table.column(name))
    for name, array in columns.items():
        out = out.append_column(name, array)
    return out


def _merge_retry(settings: CommitSettings, shard: Shard, table: pa.Table) -> pa.Table:
    """retry_failed: the new rows in place of the old failed ones, one row per key."""
    old = layout.read_shard(settings.out_uri, shard.shard_id, settings.storage)
    redone = pa.array(np.unique(table.column("manifest_row").to_numpy()), pa.int64())
    kept = old.filter(pc.invert(pc.is_in(old.column("manifest_row"), redone)))
    merged = pa.concat_tables([kept, table.select(kept.column_names)], promote_options="permissive")
    return merged.sort_by([("manifest_row", "ascending"), ("question_index", "ascending")])


class Committer:
    """An actor that runs `commit_shard` calls, several at once (threads). Zero CPUs: its work is
    mostly I/O, and it must not wait for CPUs the pipeline's tasks hold. Restarted where it dies
    (a lost node), its calls retried: a commit is idempotent (see `commit_shard`)."""

    def commit(self, *args) -> dict:
        return commit_shard(*args)


@functools.cache
def _committer_class() -> Any:
    """Made once per process: see runtime/helpers.py on why."""
    import ray

    return ray.remote(
        num_cpus=0, max_concurrency=MAX_COMMITTING, max_restarts=-1, max_task_retries=3
    )(Committer)


def _start_committers(count: int) -> list:
    return [_committer_class().remote() for _ in range(count)]
