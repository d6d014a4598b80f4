"""Stages 1-3 as one CPU task per block: block numbers -> read -> fetch -> preprocess.

Input columns:  first, last (a range of block numbers, `BlockPlan.items`)
Output columns: the last stage's (preprocess), one output batch per block number

The rows to do (the shards of this pass, in order, each shard's `rows` only where it has them)
are cut into blocks of `block_rows` rows, a whole number of model batches each, across shard
boundaries: block k is rows [k * block_rows, (k + 1) * block_rows) of that sequence, and only
the very last block is short, so no model batch is half empty at a shard's end. One task reads
a block's pieces (one or two shards' ranges), fetches and preprocesses them. Ray Data then
runs three operators (the block ranges, this stage, the model's actor pool) and one CPU task
per block; a read task per shard, a repartition and a fetch/preprocess task per block cost the
driver's scheduling loop about half its CPU again (bench/bench_driver_cpu.py).

The shards' table (id, file, range, rows, offset in the sequence) goes to the object store once;
the driver keeps its reference and at most `MAX_ITEMS` block ranges, nothing per block or row.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.columns import check_columns
from pipeline.planning.manifest import Shard

INPUT_COLUMNS = {"first": "first block number (inclusive)", "last": "last block number (exclusive)"}

# Block ranges the driver hands Ray Data: one Dataset block each. A larger job gets longer
# ranges (one task runs them one after another), so the driver's share stays this size.
MAX_ITEMS = 1000

SHARDS_SCHEMA = pa.schema(
    [
        ("shard_id", pa.string()),
        ("path", pa.string()),
        ("start", pa.int64()),
        ("end", pa.int64()),
        ("rows", pa.list_(pa.int64())),
        ("offset", pa.int64()),  # the shard's first row in the sequence of the pass
    ]
)


def shards_table(shards: list[Shard]) -> pa.Table:
    """The pass's shards in order, with each one's offset in the sequence of rows."""
    sizes = np.array([s.num_rows for s in shards], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(shards) else sizes
    return pa.table(
        {
            "shard_id": [s.shard_id for s in shards],
            "path": [s.path for s in shards],
            "start": [s.start for s in shards],
            "end": [s.end for s in shards],
            "rows": [list(s.rows) if s.rows is not None else None for s in shards],
            "offset": offsets,
        },
        schema=SHARDS_SCHEMA,
    )


def block_pieces(
    shards: pa.Table, k: int, block_rows: int, total: int, offsets: np.ndarray | None = None
) -> pa.Table:
    """Block k as ReadStage's input: the part of each shard it covers (shard descriptors).
    `offsets` is the table's `offset` column as an array, when the caller has it already."""
    lo, hi = k * block_rows, min((k + 1) * block_rows, total)
    if offsets is None:
        offsets = shards.column("offset").to_numpy()
    first = int(np.searchsorted(offsets, lo, side="right")) - 1
    last = int(np.searchsorted(offsets, hi, side="left"))
    pieces = []
    for d in shards.slice(first, last - first).to_pylist():
        rows, size = d["rows"], (len(d["rows"]) if d["rows"] is not None else d["end"] - d["start"])
        a, b = max(lo - d["offset"], 0), min(hi - d["offset"], size)
        if a >= b:
            continue
        if rows is None:
            start, end, part = d["start"] + a, d["start"] + b, None
        else:  # retry_failed: only these rows; read the range they span
            part = rows[a:b]
            start, end = part[0], part[-1] + 1
        pieces.append(
            {"shard_id": d["shard_id"], "path": d["path"], "start": start, "end": end, "rows": part}
        )
    return pa.Table.from_pylist(pieces, schema=SHARDS_SCHEMA.remove(5))


@dataclass(frozen=True)
class BlockPlan:
    """A pass cut into blocks: the shards' table in the object store and the block ranges."""

    shards: Any  # ObjectRef of `shards_table(...)`
    total_rows: int
    block_rows: int

    @classmethod
    def put(cls, shards: list[Shard], block_rows: int) -> BlockPlan:
        import ray

        total = sum(s.num_rows for s in shards)
        return cls(ray.put(shards_table(shards)), total, block_rows)

    @property
    def num_blocks(self) -> int:
        return -(-self.total_rows // self.block_rows)

    def items(self) -> list[dict[str, int]]:
        """At most MAX_ITEMS ranges of block numbers, in order, covering every block once."""
        n = self.num_blocks
        cuts = np.linspace(0, n, min(n, MAX_ITEMS) + 1).round().astype(int)
        return [{"first": int(a), "last": int(b)} for a, b in itertools.pairwise(cuts) if b > a]


Stage = Callable[[pa.Table], pa.Table]


class BlockStage:
    """Runs `stages` (read, fetch, preprocess: `builder.build` hands them in, so this module
    imports no other stage) on each block of a range in turn, yielding one batch per block."""

    def __init__(self, plan: BlockPlan, *stages: Stage):
        self.plan = plan
        self.stages = stages

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        import ray

        check_columns("BlockStage", batch, INPUT_COLUMNS)
        plan = self.plan
        shards = ray.get(plan.shards)
        offsets = shards.column("offset").to_numpy()  # once per task, not per block
        for item in batch.to_pylist():
            for k in range(item["first"], item["last"]):
                table = block_pieces(shards, k, plan.block_rows, plan.total_rows, offsets)
                for stage in self.stages:
                    table = stage(table)
                yield table
