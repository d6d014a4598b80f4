"""The manifest ids must be unique across all files (the output is joined on them): checked in
memory that does not grow with the rows in the driver.

    check_unique_ids(plan, storage)            # in-process: small manifests (prepare() does it)
    check_unique_ids(plan, storage, ray=True)  # remote tasks: any size (run() does it)

Each file is read by one task that hashes its ids (64 bits) and splits the hashes into
partitions by their top bits; one task per partition sorts its hashes and returns the repeated
ones (a handful, usually none). Only then are the ids behind a repeated hash read again, to name a
real duplicate (a bare 64-bit collision is not one). The driver holds object references, one per
(file, partition), never the ids or their hashes. A null id is reported the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import StorageConfig
from pipeline.planning.manifest import ID, ManifestError, ManifestPlan, example_row
from pipeline.storage import filesystem

# Hashes per partition task: 8 bytes each, so a partition task sorts at most ~400 MB.
ROWS_PER_PARTITION = 50_000_000
# Below this, prepare() checks in-process before Ray starts (8 bytes per row in the driver).
IN_PROCESS_ROWS = 2_000_000


def check_unique_ids(plan: ManifestPlan, storage: StorageConfig, ray: bool = False) -> None:
    """Raises `ManifestError` naming a repeated (or null) id and the files that hold it."""
    column = (plan.columns or {}).get(ID, ID)
    parts = max(1, -(-plan.total_rows // ROWS_PER_PARTITION))
    if ray:
        import ray as ray_

        hash_task = ray_.remote(num_cpus=1)(_file_hashes).options(num_returns=parts + 1)
        per_file = [hash_task.remote(uri, storage, column, parts) for uri in plan.files]
        nulls = ray_.get([refs[0] for refs in per_file])
        _raise_null(plan.files, nulls, storage, column)
        repeat_task = ray_.remote(num_cpus=1)(_repeated)
        repeated = ray_.get(
            [repeat_task.remote(*[f[1 + p] for f in per_file]) for p in range(parts)]
        )
    else:
        per_file = [_file_hashes(uri, storage, column, parts) for uri in plan.files]
        _raise_null(plan.files, [f[0] for f in per_file], storage, column)
        repeated = [_repeated(*[f[1 + p] for f in per_file]) for p in range(parts)]
    hashes = np.concatenate(repeated) if repeated else np.array([], np.uint64)
    if len(hashes):
        _name_duplicate(plan.files, hashes, storage, column)


def read_ids(uri: str, storage: StorageConfig, column: str = ID) -> pa.ChunkedArray:
    fs, path = filesystem(uri, storage)
    with fs.open(path, "rb") as f:
        ids = pq.read_table(f, columns=[column]).column(column)
    return ids.cast(pa.string()) if pa.types.is_integer(ids.type) else ids


def _hash(ids: pa.ChunkedArray) -> np.ndarray:
    from pandas.util import hash_array  # vectorized 64-bit hash (pandas comes with ray[data])

    # Hashed as bytes: an id that is not valid UTF-8 must not fail the check.
    raw = ids.cast(pa.binary()).to_numpy(zero_copy_only=False).astype(object)
    return hash_array(raw, categorize=False)


def _file_hashes(uri: str, storage: StorageConfig, column: str, parts: int) -> list[Any]:
    """[first null row or -1, hashes of partition 0, ..., of partition parts-1] of one file."""
    ids = read_ids(uri, storage, column)
    null_at = pc.index(pc.is_null(ids), True).as_py() if ids.null_count else -1
    hashes = _hash(ids.drop_null() if ids.null_count else ids)
    # Partition by the top bits, so each partition task sees every copy of a hash.
    which = (hashes >> np.uint64(40)) % np.uint64(parts)
    return [null_at, *[hashes[which == p] for p in range(parts)]]


def _repeated(*parts: np.ndarray) -> np.ndarray:
    hashes = np.sort(np.concatenate(parts)) if parts else np.array([], np.uint64)
    return np.unique(hashes[1:][hashes[1:] == hashes[:-1]])


def _raise_null(files: list[str], nulls: list[int], storage: StorageConfig, column: str) -> None:
    for uri, index in zip(files, nulls, strict=True):
        if index >= 0:
            fs, path = filesystem(uri, storage)
            with fs.open(path, "rb") as f:
                table = pq.read_table(f).slice(index, 1)
            raise ManifestError(
                f"manifest {uri}: column {column!r} is null at row {index}: {example_row(table)}"
            )


def _name_duplicate(files: list[str], repeated: np.ndarray, storage: StorageConfig, column: str):
    counts: dict[bytes, int] = {}
    where: dict[bytes, list[str]] = {}
    for uri in files:
        ids = read_ids(uri, storage, column).drop_null()
        hit = np.isin(_hash(ids), repeated)
        if not hit.any():
            continue
        for value in ids.cast(pa.binary()).to_numpy(zero_copy_only=False)[hit]:
            counts[value] = counts.get(value, 0) + 1
            where.setdefault(value, []).append(uri)
    dups = {v: n for v, n in counts.items() if n > 1}
    if dups:
        first = min(dups)
        raise ManifestError(
            f"manifest column {column!r} must be unique: {len(dups)} ids repeat, e.g. "
            f"{first.decode('utf-8', 'replace')!r} (x{dups[first]}) in "
            f"{', '.join(sorted(set(where[first])))}"
        )
