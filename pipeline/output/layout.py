"""The output layout and its commit protocol (see ARCHITECTURE.md, "Output layout").

    OUT/shards/<shard_id>.parquet      written whole: local temp file + rename, or one PUT
    OUT/shards/<shard_id>.stats.json   written last; its existence is what "committed" means
    OUT/_SUCCESS, OUT/summary.json     written when every shard of the run is committed

Incremental runs use the same layout under OUT/runs/<run_id>/. The listing of stats files is
the only truth about what is done: no in-memory set of ids survives a crash, and none is needed.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import StorageConfig
from pipeline.storage import filesystem, is_remote, join

SHARDS_DIR = "shards"
STATS_SUFFIX = ".stats.json"
SUCCESS = "_SUCCESS"
SUMMARY = "summary.json"
RUNS_DIR = "runs"


def shard_uris(out_uri: str, shard_id: str) -> tuple[str, str]:
    base = join(out_uri, SHARDS_DIR, shard_id)
    return base + ".parquet", base + STATS_SUFFIX


def write_bytes_atomic(uri: str, data: bytes, storage: StorageConfig) -> None:
    """Make `data` visible at `uri` all at once, or not at all.

    On object storage a single PUT is atomic (readers see the old object or the new one), so
    objects are written with one `pipe` call, never as a multipart stream. Locally the bytes go
    to a temp file in the same directory, are fsynced, then renamed over the target.
    """
    fs, path = filesystem(uri, storage)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
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
    """Write the shard's rows, then its stats file (the commit marker), in that order."""
    data_uri, stats_uri = shard_uris(out_uri, shard_id)
    write_bytes_atomic(data_uri, table_to_parquet_bytes(table), storage)
    write_bytes_atomic(stats_uri, json.dumps(stats, indent=1, sort_keys=True).encode(), storage)


def committed_shards(out_uri: str, storage: StorageConfig) -> set[str]:
    """Ids of the shards whose stats file exists (one listing call)."""
    fs, path = filesystem(join(out_uri, SHARDS_DIR), storage)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return set()
    return {posixpath.basename(n)[: -len(STATS_SUFFIX)] for n in names if n.endswith(STATS_SUFFIX)}


def read_stats(out_uri: str, shard_ids: list[str], storage: StorageConfig) -> dict[str, dict]:
    fs, _ = filesystem(out_uri, storage)
    paths = [filesystem(shard_uris(out_uri, s)[1], storage)[1] for s in shard_ids]
    if not paths:
        return {}
    blobs = fs.cat(paths) if len(paths) > 1 else {paths[0]: fs.cat_file(paths[0])}
    return {s: json.loads(blobs[p]) for s, p in zip(shard_ids, paths, strict=True)}


def read_shard(
    out_uri: str, shard_id: str, storage: StorageConfig, columns: list[str] | None = None
) -> pa.Table:
    fs, path = filesystem(shard_uris(out_uri, shard_id)[0], storage)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def read_output(
    out_uri: str, storage: StorageConfig | None = None, columns: list[str] | None = None
) -> pa.Table:
    """All committed rows of an output (uncommitted files are ignored).

    For incremental outputs (OUT/runs/*), the latest run's row wins for each (id, question_index).
    """
    storage = storage or StorageConfig()
    runs = list_runs(out_uri, storage)
    if not runs:
        ids = sorted(committed_shards(out_uri, storage))
        tables = [read_shard(out_uri, s, storage, columns) for s in ids]
        return pa.concat_tables(tables) if tables else pa.table({})
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for run in runs:  # oldest first, so later runs overwrite
        run_uri = join(out_uri, RUNS_DIR, run)
        for s in sorted(committed_shards(run_uri, storage)):
            for row in read_shard(run_uri, s, storage, columns).to_pylist():
                latest[(row["id"], row["question_index"])] = row
    return pa.Table.from_pylist(list(latest.values()))


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
            started = json.loads(fs.cat_file(posixpath.join(entry, "run.json")))["started_at"]
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


def uncommit(out_uri: str, shard_ids: list[str], storage: StorageConfig) -> None:
    """Take shards out of the output: stats files (the commit markers) first, then the data."""
    if not shard_ids:
        return
    for index in (1, 0):  # shard_uris() gives (data, stats)
        uris = [shard_uris(out_uri, s)[index] for s in shard_ids]
        fs = filesystem(uris[0], storage)[0]
        paths = [filesystem(u, storage)[1] for u in uris]
        if is_remote(out_uri):
            fs.rm(paths)  # batched deletes; a missing key is not an error on object stores
        else:
            for path in paths:
                if os.path.exists(path):
                    os.remove(path)
