"""Cutting a pass's shards into blocks (pipeline/stages/blocks.py): every row once, in order,
blocks of a whole number of model batches across shard boundaries, and the driver's share
bounded (at most MAX_ITEMS block ranges)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_job
from pipeline.planning.manifest import Shard
from pipeline.stages import blocks
from pipeline.stages.read import ReadStage


def _rows(shards: list[Shard], block_rows: int) -> list[list[tuple[str, int]]]:
    """The (shard, row) pairs of every block, block by block."""
    table = blocks.shards_table(shards)
    total = sum(s.num_rows for s in shards)
    out = []
    for k in range(-(-total // block_rows)):
        block = []
        for p in blocks.block_pieces(table, k, block_rows, total).to_pylist():
            rows = p["rows"] if p["rows"] is not None else range(p["start"], p["end"])
            assert all(p["start"] <= r < p["end"] for r in rows)
            block += [(p["shard_id"], r) for r in rows]
        out.append(block)
    return out


def test_blocks_cross_shard_boundaries_and_cover_every_row_once():
    shards = [
        Shard("a", "f1", 0, 7),
        Shard("b", "f1", 7, 10),
        Shard("c", "f2", 0, 1),
        Shard("d", "f2", 1, 12),
    ]
    got = _rows(shards, 4)
    expected = [(s.shard_id, r) for s in shards for r in range(s.start, s.end)]
    assert [len(b) for b in got] == [4, 4, 4, 4, 4, 2]  # only the last block is short
    assert [x for b in got for x in b] == expected
    assert got[1] == [("a", 4), ("a", 5), ("a", 6), ("b", 7)]


def test_blocks_of_shards_with_only_some_rows():
    # retry_failed: a shard's `rows` only; a block reads the range they span.
    shards = [Shard("a", "f", 0, 100, rows=(3, 50, 99)), Shard("b", "f", 100, 200, rows=(150,))]
    got = _rows(shards, 2)
    assert got == [[("a", 3), ("a", 50)], [("a", 99), ("b", 150)]]
    pieces = blocks.block_pieces(blocks.shards_table(shards), 0, 2, 4).to_pylist()
    assert (pieces[0]["start"], pieces[0]["end"]) == (3, 51)


def test_block_ranges_are_bounded_and_cover_every_block_once():
    plan = blocks.BlockPlan(shards=None, total_rows=10_000, block_rows=3)
    items = plan.items()
    assert plan.num_blocks == 3334 and len(items) == blocks.MAX_ITEMS
    covered = [k for it in items for k in range(it["first"], it["last"])]
    assert covered == list(range(plan.num_blocks))
    small = blocks.BlockPlan(shards=None, total_rows=10, block_rows=4).items()
    assert small == [{"first": 0, "last": 1}, {"first": 1, "last": 2}, {"first": 2, "last": 3}]


@pytest.fixture
def manifest(tmp_path):
    path = tmp_path / "m.parquet"
    ids = [f"r{i:02d}" for i in range(10)]
    pq.write_table(
        pa.table({"id": ids, "image": [f"{tmp_path}/{i}.jpg" for i in ids]}),
        path,
        row_group_size=3,
    )
    return str(path)


def test_block_stage_reads_each_block_as_its_rows(manifest, tmp_path):
    """The pieces of a block, through the real ReadStage: the block's manifest rows, in order."""
    job = parse_job(
        {
            "name": "blocks",
            "input": {"uri": manifest},
            "output": {"uri": str(tmp_path / "out")},
            "model": {"visual": str(tmp_path), "llm": str(tmp_path)},
        }
    )
    shards = [Shard("s0", manifest, 0, 4), Shard("s1", manifest, 4, 10)]
    table = blocks.shards_table(shards)
    read = ReadStage.for_job(job)
    got = [
        read(blocks.block_pieces(table, k, 3, 10)).select(["shard", "row", "id"]).to_pylist()
        for k in range(4)
    ]
    assert [[r["id"] for r in b] for b in got] == [
        ["r00", "r01", "r02"],
        ["r03", "r04", "r05"],
        ["r06", "r07", "r08"],
        ["r09"],
    ]
    assert [r["shard"] for r in got[1]] == ["s0", "s1", "s1"]


def test_a_row_group_is_read_once_for_its_blocks_and_again_when_the_file_changes(
    manifest, monkeypatch
):
    """Blocks are smaller than row groups: each group is decoded once per worker, not once per
    block; a file rewritten under the same name is read anew."""
    from pipeline.config import StorageConfig
    from pipeline.planning import manifest as m

    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_group",
        lambda self, i, **kw: reads.append(i) or real(self, i, **kw),
    )
    monkeypatch.setattr(m, "_last_group", None)
    storage = StorageConfig()
    got = [m.read_rows(Shard("s", manifest, a, a + 1), storage)["id"][0].as_py() for a in range(6)]
    assert got == [f"r{i:02d}" for i in range(6)]
    assert reads == [0, 1]  # row groups of 3 rows: one read each, for 6 one-row reads
    pq.write_table(pa.table({"id": [f"n{i}" for i in range(10)], "image": ["x"] * 10}), manifest)
    assert m.read_rows(Shard("s", manifest, 5, 6), storage)["id"].to_pylist() == ["n5"]
