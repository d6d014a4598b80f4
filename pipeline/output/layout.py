"""The output layout and its commit protocol (see ARCHITECTURE.md, "Output layout").

    OUT/shards/<shard_id>.parquet     the committed rows of one shard; written last, whole (local:
                                      hidden temp file + rename; object storage: one PUT): its
                                      existence is what "committed" means
    OUT/_stats/<shard_id>.json        the shard's figures, written just before its data file
    OUT/_staging/[<run_id>/]<shard_id>/*.parquet  answer rows staged by workers, not committed
    OUT/_SUCCESS, OUT/_summary.json   written when every shard of the run is committed
    OUT/_input/                       manifests the run wrote itself (input.images listings)

Everything but the committed rows starts with `_` (or `.` for local temp files), the Hadoop /
Spark convention: pandas, pyarrow, DuckDB, Spark, Hugging Face `datasets` and Ray Data pointed
at OUT read exactly the committed rows, once. Incremental runs use the same layout under
OUT/runs/<run_id>/ (one run's rows per directory; `merge` writes the newest-answer view). The
listing of `shards/` is the only truth about what is done: no in-memory set of ids survives a
crash, and none is needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import StorageConfig
from pipeline.storage import filesystem, is_remote, join

SHARDS_DIR = "shards"
STATS_DIR = "_stats"
STAGING_DIR = "_staging"
SUCCESS = "_SUCCESS"
SUMMARY = "_summary.json"
RUN_MARKER = "_run.json"  # OUT/runs/<run_id>/_run.json: when an incremental run started
RUNS_DIR = "runs"
# Before this layout, stats files sat beside the shards and marked the commit: such an output
# is refused, not misread (a .parquet without its stats file was uncommitted there).
_LEGACY_STATS_SUFFIX = ".stats.json"


class LegacyOutputError(ValueError):
    """An output written by an older ziya-batch, with another commit marker."""


def shard_uri(out_uri: str, shard_id: str) -> str:
    return join(out_uri, SHARDS_DIR, shard_id + ".parquet")


def stats_uri(out_uri: str, shard_id: str) -> str:
    return join(out_uri, STATS_DIR, shard_id + ".json")


def staging_root(output_uri: str, run_id: str | None = None) -> str:
    """Where a run stages its answer rows: OUT/_staging/, or OUT/_staging/<run_id>/ for an
    incremental run (at the top of OUT, never under runs/: every reader skips it there)."""
    root = join(output_uri, STAGING_DIR)
    return join(root, run_id) if run_id else root


def staging_uri(root: str, shard_id: str) -> str:
    return join(root, shard_id)


def write_bytes_atomic(uri: str, data: bytes, storage: StorageConfig) -> None:
    """Make `data` visible at `uri` all at once, or not at all.

    On object storage a single PUT is atomic (readers see the old object or the new one), so
    objects are written with one `pipe` call, never as a multipart stream. Locally the bytes go
    to a hidden temp file in the same directory (a leading `.`: dataset readers skip it), are
    fsynced, then renamed over the target.
    """
    fs, path = filesystem(uri, storage)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def commit_shard(
    out_uri: str, shard_id: str, table: pa.Table, stats: dict, storage: StorageConfig
) -> None:
    """Write the shard's stats, then its rows (the commit), in that order."""
    write_json(stats_uri(out_uri, shard_id), stats, storage)
    write_bytes_atomic(shard_uri(out_uri, shard_id), table_to_parquet_bytes(table), storage)


def committed_shards(out_uri: str, storage: StorageConfig) -> set[str]:
    """Ids of the committed shards (one listing call)."""
    fs, path = filesystem(join(out_uri, SHARDS_DIR), storage)
    try:
        names = [posixpath.basename(n) for n in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return set()
    if any(n.endswith(_LEGACY_STATS_SUFFIX) for n in names):
        raise LegacyOutputError(
            f"{out_uri} was written by an older ziya-batch (stats files beside the shards); "
            "write to a new output.uri, or rerun it with run.mode=overwrite"
        )
    return {n[: -len(".parquet")] for n in names if n.endswith(".parquet")}


def read_stats(out_uri: str, shard_ids: list[str], storage: StorageConfig) -> dict[str, dict]:
    """Stats of committed shards; a shard whose stats file is missing maps to {}."""
    if not shard_ids:
        return {}
    fs, _ = filesystem(out_uri, storage)
    paths = [filesystem(stats_uri(out_uri, s), storage)[1] for s in shard_ids]
    blobs = fs.cat(paths, on_error="omit")
    return {
        s: json.loads(blobs[p]) if p in blobs else {} for s, p in zip(shard_ids, paths, strict=True)
    }


def read_shard(
    out_uri: str, shard_id: str, storage: StorageConfig, columns: list[str] | None = None
) -> pa.Table:
    fs, path = filesystem(shard_uri(out_uri, shard_id), storage)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


@dataclass(frozen=True)
class CommittedShard:
    run: str | None  # incremental run id (None: a plain output)
    run_uri: str  # where the shard's run writes (OUT, or OUT/runs/<run>)
    shard_id: str


def committed(out_uri: str, storage: StorageConfig | None = None) -> list[CommittedShard]:
    """Every committed shard of an output, oldest run first: what every reader of the output
    (read_output, merge, the report) goes through."""
    storage = storage or StorageConfig()
    runs = list_runs(out_uri, storage)
    if not runs:
        return [
            CommittedShard(None, out_uri, s) for s in sorted(committed_shards(out_uri, storage))
        ]
    out = []
    for run in runs:
        run_uri = join(out_uri, RUNS_DIR, run)
        out.extend(
            CommittedShard(run, run_uri, s) for s in sorted(committed_shards(run_uri, storage))
        )
    return out


def iter_tables(
    shards: list[CommittedShard], storage: StorageConfig, columns: list[str] | None = None
) -> Iterator[tuple[CommittedShard, pa.Table]]:
    for s in shards:
        yield s, read_shard(s.run_uri, s.shard_id, storage, columns)


def newest_answers(tables: list[pa.Table]) -> pa.Table:
    """One row per (id, question_index): the row of the latest table holding it (tables in run
    order, oldest first)."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pa.table({})
    if len(tables) == 1:
        return tables[0]
    merged = pa.concat_tables(tables, promote_options="permissive")
    order = np.arange(merged.num_rows)
    keys = pa.table(
        {"id": merged.column("id"), "q": merged.column("question_index"), "order": order}
    )
    # The last occurrence of each key wins: group by key, take the largest position.
    last = keys.group_by(["id", "q"], use_threads=False).aggregate([("order", "max")])
    return merged.take(np.sort(last.column("order_max").to_numpy()))


def read_output(
    out_uri: str, storage: StorageConfig | None = None, columns: list[str] | None = None
) -> pa.Table:
    """All committed rows of an output (uncommitted and staged files are never read).

    For incremental outputs (OUT/runs/*), the latest run's row wins for each (id, question_index).
    """
    storage = storage or StorageConfig()
    shards = committed(out_uri, storage)
    if columns is not None and any(s.run for s in shards):
        columns = list(dict.fromkeys([*columns, "id", "question_index"]))
    tables = [t for _, t in iter_tables(shards, storage, columns)]
    if not tables:
        return pa.table({})
    if not any(s.run for s in shards):
        return pa.concat_tables(tables, promote_options="permissive")
    return newest_answers(tables)


def list_runs(out_uri: str, storage: StorageConfig) -> list[str]:
    """Incremental run ids under OUT/runs/, oldest first (by their start marker's content)."""
    fs, path = filesystem(join(out_uri, RUNS_DIR), storage)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    runs = []
    for entry in entries:
        name = posixpath.basename(entry.rstrip("/"))
        try:
            started = json.loads(fs.cat_file(posixpath.join(entry, RUN_MARKER)))["started_at"]
        except (FileNotFoundError, KeyError, ValueError):
            continue
        runs.append((started, name))
    return [name for _, name in sorted(runs)]


def write_json(uri: str, payload: dict, storage: StorageConfig) -> None:
    write_bytes_atomic(
        uri, json.dumps(payload, indent=1, sort_keys=True, default=str).encode(), storage
    )


def exists(uri: str, storage: StorageConfig) -> bool:
    fs, path = filesystem(uri, storage)
    return fs.exists(path)


def remove(uri: str, storage: StorageConfig) -> None:
    fs, path = filesystem(uri, storage)
    if fs.exists(path):
        fs.rm_file(path)


def remove_tree(uri: str, storage: StorageConfig) -> None:
    """Delete a directory / prefix and everything under it (staging left by a killed run)."""
    fs, path = filesystem(uri, storage)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def _remove_all(uris: list[str], storage: StorageConfig) -> None:
    if not uris:
        return
    fs = filesystem(uris[0], storage)[0]
    paths = [filesystem(u, storage)[1] for u in uris]
    if is_remote(uris[0]):
        fs.rm(paths)  # batched deletes; a missing key is not an error on object stores
        return
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def uncommit(out_uri: str, shard_ids: list[str], storage: StorageConfig) -> None:
    """Take shards out of the output: the data files (the commits) first, then their stats."""
    _remove_all([shard_uri(out_uri, s) for s in shard_ids], storage)
    _remove_all([stats_uri(out_uri, s) for s in shard_ids], storage)
