"""The newest-answer view of an output, as a plain Parquet dataset (`ziya-batch merge`).

    ziya-batch merge OUT DEST [--job job.yaml | --endpoint-url URL] [--rows-per-file N]

An incremental output holds one directory per run (OUT/runs/<run_id>/shards/); a row relabeled
by a later run is in several of them. `merge` writes one row per (id, question_index), the one
of the latest run holding it (`layout.newest_answers`), as DEST/part-NNNNN.parquet, then
DEST/_merge.json (what was merged) and DEST/_SUCCESS last. A plain (non-incremental) output
has nothing to merge: its committed shards are copied as they are, so DEST is the same rows.

Memory stays bounded by partitioning on a hash of `id`:
1. the shards' Parquet footers give the row count (hence N = rows / rows_per_file output
   files) and one schema for every file (`unify_schemas`, permissive);
2. the committed shards are streamed once, oldest run first, and each one's rows are split by
   hash(id) % N into local spill files, one per (run, partition) (--tmp-dir, default the
   system's temp dir: needs about the output's size on disk);
3. each output file is built from its partition's spill files alone: newest answer per key,
   sorted by (id, question_index), written in one piece.
The process holds one partition's rows (about rows_per_file times the number of runs that
relabeled them) plus a few shards being read, whatever the output's size. Keys are compared
exactly; the hash only chooses the partition.

`key_hash` / `NewestFilter` are also how the report shows the newest answers of an incremental
output while streaming its shards once (pipeline/output/report.py).
"""

from __future__ import annotations

import math
import posixpath
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import StorageConfig
from pipeline.output import layout
from pipeline.storage import filesystem, is_remote, join

DEFAULT_ROWS_PER_FILE = 500_000
_READ_AHEAD = 8  # shards read ahead on threads (object storage is latency-bound)
_SPILL_FLUSH_ROWS = 200_000  # rows buffered over all partitions before they go to disk
KEY = ("id", "question_index")


class MergeError(ValueError):
    """Nothing to merge, or a destination that would corrupt or hide data."""


@dataclass
class MergeResult:
    dest: str
    incremental: bool
    runs: list[str]
    shards: int
    rows_read: int  # rows over every committed shard of every run
    rows: int  # rows written: one per (id, question_index)
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "dest": self.dest,
            "incremental": self.incremental,
            "runs": self.runs,
            "shards": self.shards,
            "rows_read": self.rows_read,
            "rows": self.rows,
            "files": [posixpath.basename(f) for f in self.files],
            "warnings": self.warnings,
        }


def key_hash(table: pa.Table) -> np.ndarray:
    """A 64-bit hash of each row's (id, question_index), stable across processes and runs."""
    ids = _id_hash(table)
    q = table.column("question_index").to_numpy(zero_copy_only=False).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = ids ^ ((q + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15))
        h ^= h >> np.uint64(31)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
    return h


def _id_hash(table: pa.Table) -> np.ndarray:
    from pandas.util import hash_array  # pandas comes with ray[data]

    ids = table.column("id").cast(pa.string()).to_numpy(zero_copy_only=False)
    return hash_array(ids.astype(object), categorize=False).astype(np.uint64)


class NewestFilter:
    """Which rows of an incremental output are the newest answer of their (id, question_index).

    A row of run r is hidden when a later run holds its key. Only the keys of the runs after the
    oldest are held (the oldest run is usually the big one, and is only streamed): 64-bit key
    hashes and the newest run index, about 10 bytes per row of those runs. Keys are compared by
    hash: two different keys sharing a hash (odds about n^2 / 2^65 for n keys) would hide one
    row from the view; `merge` compares keys exactly instead.
    """

    def __init__(self, runs: list[str]):
        self.order = {run: i for i, run in enumerate(runs)}
        self.hashes = np.zeros(0, np.uint64)
        self.newest = np.zeros(0, np.int16)

    def add_later_keys(self, parts: list[tuple[str, pa.Table]]) -> None:
        """(run, table of id and question_index) of every shard of the runs after the oldest."""
        if not parts:
            return
        hashes = np.concatenate([key_hash(t) for _, t in parts])
        runs = np.concatenate([np.full(t.num_rows, self.order[r], np.int16) for r, t in parts])
        order = np.lexsort((runs, hashes))  # by hash, then run: the last of a hash is the newest
        hashes, runs = hashes[order], runs[order]
        last = np.ones(len(hashes), bool)
        last[:-1] = hashes[1:] != hashes[:-1]
        self.hashes, self.newest = hashes[last], runs[last]

    def keep(self, run: str, table: pa.Table) -> np.ndarray:
        """Mask of the rows of `table` (a shard of `run`) that are the newest answer."""
        if not len(self.hashes) or table.num_rows == 0:
            return np.ones(table.num_rows, bool)
        h = key_hash(table)
        pos = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        found = self.hashes[pos] == h
        return ~found | (self.newest[pos] <= self.order[run])


def _footers(shards: list[layout.CommittedShard], storage: StorageConfig) -> list[pq.FileMetaData]:
    def read(s: layout.CommittedShard) -> pq.FileMetaData:
        fs, path = filesystem(layout.shard_uri(s.run_uri, s.shard_id), storage)
        with fs.open(path, "rb") as f:
            return pq.read_metadata(f)

    with ThreadPoolExecutor(max_workers=_READ_AHEAD) as pool:
        return list(pool.map(read, shards))


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns, in its order (missing ones null)."""
    columns = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            columns.append(col if col.type == f.type else col.cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _read_ahead(shards: list[layout.CommittedShard], storage: StorageConfig) -> Iterator[pa.Table]:
    with ThreadPoolExecutor(max_workers=_READ_AHEAD) as pool:
        pending = []
        for s in shards:
            pending.append(pool.submit(layout.read_shard, s.run_uri, s.shard_id, storage))
            if len(pending) >= _READ_AHEAD:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()


def _check_dest(out_uri: str, dest_uri: str, storage: StorageConfig, overwrite: bool) -> None:
    def norm(uri: str) -> str:
        _, path = filesystem(uri, storage)
        if not is_remote(uri):
            path = str(Path(path).resolve())
        return path.rstrip("/") + "/"

    if is_remote(out_uri) == is_remote(dest_uri) and norm(dest_uri).startswith(norm(out_uri)):
        raise MergeError(
            f"DEST {dest_uri} is inside the output {out_uri}: readers of the output would read "
            "the merged rows too; write it elsewhere"
        )
    fs, path = filesystem(dest_uri, storage)
    try:
        present = fs.ls(path, detail=False)
    except FileNotFoundError:
        present = []
    if present and not overwrite:
        raise MergeError(f"{dest_uri} is not empty; pass --overwrite to replace it")
    if present:
        layout.remove_tree(dest_uri, storage)


def merge(
    out_uri: str,
    dest_uri: str,
    storage: StorageConfig | None = None,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    overwrite: bool = False,
    tmp_dir: str | None = None,
) -> MergeResult:
    """Write the newest-answer view of the output at `out_uri` as a Parquet dataset at
    `dest_uri` (see the module docstring). `storage` serves both locations."""
    storage = storage or StorageConfig()
    shards = layout.committed(out_uri, storage)
    if not shards:
        raise MergeError(f"no committed shard in {out_uri}: nothing to merge")
    _check_dest(out_uri, dest_uri, storage, overwrite)
    runs = list(dict.fromkeys(s.run for s in shards if s.run))
    if not runs:
        result = _copy_plain(shards, dest_uri, storage)
        if not layout.exists(join(out_uri, layout.SUCCESS), storage):
            result.warnings.append(
                f"{out_uri} is not finished (no _SUCCESS): its committed shards are copied"
            )
    else:
        result = _merge_runs(shards, runs, dest_uri, storage, rows_per_file, tmp_dir)
        latest = join(out_uri, layout.RUNS_DIR, runs[-1], layout.SUCCESS)
        if not layout.exists(latest, storage):
            result.warnings.append(
                f"the latest run, {runs[-1]}, is not finished (no _SUCCESS): its committed "
                "shards are merged, the rest of it is not"
            )
    layout.write_json(
        join(dest_uri, "_merge.json"),
        {**result.as_dict(), "source": out_uri, "merged_at": time.time()},
        storage,
    )
    layout.write_bytes_atomic(join(dest_uri, layout.SUCCESS), b"", storage)
    return result


def _copy_plain(
    shards: list[layout.CommittedShard], dest_uri: str, storage: StorageConfig
) -> MergeResult:
    """A plain output's rows are unique already: copy each committed shard as it is."""
    result = MergeResult(dest_uri, False, [], len(shards), 0, 0)

    def copy(s: layout.CommittedShard) -> tuple[str, int]:
        fs, path = filesystem(layout.shard_uri(s.run_uri, s.shard_id), storage)
        data = fs.cat_file(path)
        target = join(dest_uri, f"part-{s.shard_id}.parquet")
        layout.write_bytes_atomic(target, data, storage)
        return target, pq.read_metadata(pa.BufferReader(data)).num_rows

    with ThreadPoolExecutor(max_workers=_READ_AHEAD) as pool:
        for target, n in pool.map(copy, shards):
            result.files.append(target)
            result.rows += n
    result.rows_read = result.rows
    return result


def _merge_runs(
    shards: list[layout.CommittedShard],
    runs: list[str],
    dest_uri: str,
    storage: StorageConfig,
    rows_per_file: int,
    tmp_dir: str | None,
) -> MergeResult:
    footers = _footers(shards, storage)
    rows_read = sum(m.num_rows for m in footers)
    schema = pa.unify_schemas(
        [m.schema.to_arrow_schema().remove_metadata() for m in footers],
        promote_options="permissive",
    )
    n_files = max(1, math.ceil(rows_read / max(1, rows_per_file)))
    result = MergeResult(dest_uri, True, runs, len(shards), rows_read, 0)
    spill = Path(tempfile.mkdtemp(prefix="ziya-merge-", dir=tmp_dir))
    try:
        _spill(shards, runs, schema, n_files, spill, storage)
        for p in range(n_files):
            tables = [
                pq.read_table(spill / f"r{r:04d}-p{p:05d}.parquet")
                for r in range(len(runs))
                if (spill / f"r{r:04d}-p{p:05d}.parquet").exists()
            ]
            merged = layout.newest_answers(tables) if tables else schema.empty_table()
            if merged.num_rows:
                merged = merged.sort_by([(k, "ascending") for k in KEY])
            else:
                merged = schema.empty_table()
            target = join(dest_uri, f"part-{p:05d}.parquet")
            layout.write_bytes_atomic(target, layout.table_to_parquet_bytes(merged), storage)
            result.files.append(target)
            result.rows += merged.num_rows
            del tables, merged
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    return result


def _spill(
    shards: list[layout.CommittedShard],
    runs: list[str],
    schema: pa.Schema,
    n_files: int,
    spill: Path,
    storage: StorageConfig,
) -> None:
    """Split every shard's rows by hash(id) into one local file per (run, partition)."""
    run_index = {r: i for i, r in enumerate(runs)}
    writers: dict[int, pq.ParquetWriter] = {}
    buffers: dict[int, list[pa.Table]] = {}
    buffered = 0
    current = -1

    def flush() -> None:
        nonlocal buffered
        for p, parts in buffers.items():
            if p not in writers:
                path = spill / f"r{current:04d}-p{p:05d}.parquet"
                writers[p] = pq.ParquetWriter(path, schema, compression="zstd")
            writers[p].write_table(pa.concat_tables(parts))
        buffers.clear()
        buffered = 0

    def close_run() -> None:
        flush()
        for w in writers.values():
            w.close()
        writers.clear()

    for s, table in zip(shards, _read_ahead(shards, storage), strict=True):
        r = run_index[s.run]
        if r != current:
            close_run()  # oldest run first: a run's files are complete before the next one's
            current = r
        if table.num_rows == 0:
            continue
        table = _conform(table, schema)
        part = (_id_hash(table) % np.uint64(n_files)).astype(np.int64)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(n_files + 1))
        for p in range(n_files):
            lo, hi = bounds[p], bounds[p + 1]
            if hi > lo:
                buffers.setdefault(p, []).append(table.take(pa.array(order[lo:hi])))
        buffered += table.num_rows
        if buffered >= _SPILL_FLUSH_ROWS:
            flush()
    close_run()
