"""WebDataset input (`input.format: webdataset`): tars indexed once, read by range, end to end.

Unit tests call the planner and the read/fetch/preprocess stages directly (no Ray) on tars
written here the way img2dataset writes them ({key}.jpg, {key}.txt, {key}.json members and a
sidecar {shard}.parquet). The end-to-end test runs a set of tars on moto S3 over HTTP through a
real local Ray with the tiny model, then resumes after one tar's shard is taken out.

Run: .venv/bin/python -m pytest tests/test_webdataset.py -q
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfigError, parse_job
from pipeline.planning import webdataset
from pipeline.planning.manifest import ManifestError, plan
from pipeline.stages.read import ReadStage

SIDECAR_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("error_message", pa.string()),
        ("status", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
    ]
)


def write_tar(members: list[tuple[str, bytes]], links: list[tuple[str, str]] = ()) -> bytes:
    """A plain tar holding `members` (name, data) in this order, then symlinks (name, target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o444, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def img2dataset_shard(shard: int, photos: list[bytes | None]) -> tuple[bytes, pa.Table]:
    """One shard of img2dataset's `webdataset` output: the tar ({key}.jpg, {key}.txt,
    {key}.json per downloaded image) and its sidecar parquet (one row per URL tried; a None
    photo is a failed download: in the sidecar only)."""
    members: list[tuple[str, bytes]] = []
    rows = []
    for i, photo in enumerate(photos):
        key = f"{shard:05d}{i:04d}"
        ok = photo is not None
        meta = {
            "key": key,
            "url": f"https://example.com/{key}.jpg",
            "caption": f"caption {key}",
            "error_message": None if ok else "HTTP Error 404: Not Found",
            "status": "success" if ok else "failed_to_download",
            "width": 64 if ok else None,
            "height": 48 if ok else None,
            "sha256": f"{i:064x}" if ok else None,
        }
        rows.append(meta)
        if ok:
            members += [
                (f"{key}.jpg", photo),
                (f"{key}.txt", meta["caption"].encode()),
                (f"{key}.json", json.dumps(meta).encode()),
            ]
    return write_tar(members), pa.Table.from_pylist(rows, schema=SIDECAR_SCHEMA)


def _job(tmp_path: Path, uri, **over):
    data = {
        "input": {"uri": uri, "format": "webdataset"},
        "output": {"uri": str(tmp_path / "out"), "rows_per_shard": 2},
        "task": {"kind": "caption"},
        "model": {"visual": "/m/visual", "llm": "/m/llm"},
    }
    for name, values in over.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_job(data)


def _shards(p) -> pa.Table:
    return pa.Table.from_pylist(
        [{"shard_id": s.shard_id, "path": s.path, "start": s.start, "end": s.end} for s in p.shards]
    )


@pytest.fixture
def photos(photo_dir) -> list[bytes]:
    return [p.read_bytes() for p in sorted(photo_dir.glob("*.jpg"))]


def _write_set(root: Path, shards: list[list[bytes | None]], sidecars: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for n, items in enumerate(shards):
        tar, sidecar = img2dataset_shard(n, items)
        (root / f"{n:05d}.tar").write_bytes(tar)
        if sidecars:
            pq.write_table(sidecar, root / f"{n:05d}.parquet")
        (root / f"{n:05d}_stats.json").write_text("{}")  # img2dataset writes these too


# -- planning -------------------------------------------------------------------------------------


def test_tars_are_indexed_once_and_planned_per_tar(tmp_path, photos, monkeypatch):
    root = tmp_path / "wds"
    _write_set(root, [[photos[0], None, photos[1]], [photos[2]]])
    job = _job(tmp_path, str(root))
    p = plan(job)
    index_dir = tmp_path / "out" / "_input" / "webdataset"
    assert [Path(f).parent for f in p.files] == [index_dir, index_dir]
    assert [Path(f).name.split("-")[0] for f in p.files] == ["00000", "00001"]
    index = pq.read_table(p.files[0])
    # Tar order, then the sidecar's keys without an image (img2dataset's failed download).
    assert index.column("id").to_pylist() == ["000000000", "000000002", "000000001"]
    assert index.column("tar").to_pylist() == [str(root / "00000.tar")] * 3
    assert index.column("txt").to_pylist() == ["caption 000000000", "caption 000000002", None]
    assert json.loads(index.column("json")[1].as_py())["key"] == "000000002"
    assert index.column("status").to_pylist() == ["success", "success", "failed_to_download"]
    # offset/size point at the image member's bytes.
    raw = (root / "00000.tar").read_bytes()
    off, size = index.column("offset")[0].as_py(), index.column("size")[0].as_py()
    assert raw[off : off + size] == photos[0]
    assert index.column("offset")[2].as_py() is None
    # A shard is a range of one tar's rows; the index's bookkeeping never reaches the output,
    # the texts and the sidecar's columns do (its status is the source status, not passed).
    assert [(Path(s.path).name.split("-")[0], s.start, s.end) for s in p.shards] == [
        ("00000", 0, 2),
        ("00000", 2, 3),
        ("00001", 0, 1),
    ]
    assert p.total_rows == 4
    assert p.passthrough_columns == [
        "txt",
        "json",
        "url",
        "caption",
        "error_message",
        "width",
        "height",
        "sha256",
    ]
    assert p.sources == [str(root) + "/"]

    # Planned again: nothing is indexed (no tar is read), the same files and shards.
    def refuse(*args, **kwargs):
        raise AssertionError("an unchanged tar was indexed again")

    mtimes = {f: os.stat(f).st_mtime_ns for f in p.files}
    with monkeypatch.context() as patch:
        patch.setattr(webdataset, "scan_tar", refuse)
        again = plan(job)
    assert again.files == p.files and again.shards == p.shards
    assert {f: os.stat(f).st_mtime_ns for f in p.files} == mtimes
    # A replaced tar gets a new index (and new shards); the other tar's index is reused.
    tar, _ = img2dataset_shard(1, [photos[3], photos[4]])
    (root / "00001.tar").write_bytes(tar)
    changed = plan(job)
    assert changed.files[0] == p.files[0] and changed.files[1] != p.files[1]
    assert changed.total_rows == 5


def test_single_tar_list_and_no_sidecar(tmp_path, photos):
    root = tmp_path / "wds"
    _write_set(root, [[photos[0]], [photos[1], photos[2]]], sidecars=False)
    one = plan(_job(tmp_path, str(root / "00001.tar")))
    assert one.total_rows == 2 and len(one.files) == 1
    assert one.passthrough_columns == ["txt", "json"]
    assert one.columns == {"id": "id"}  # no sidecar: no source status
    both = plan(_job(tmp_path, [str(root / "00001.tar"), str(root / "00000.tar")]))
    assert [pq.read_table(f).column("id").to_pylist() for f in both.files] == [
        ["000010000", "000010001"],
        ["000000000"],
    ]
    with pytest.raises(ManifestError, match="does not exist"):
        plan(_job(tmp_path, str(root / "missing.tar")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match=r"holds no \.tar files"):
        plan(_job(tmp_path, str(tmp_path / "empty")))


def test_sidecars_must_match_across_tars(tmp_path, photos):
    root = tmp_path / "wds"
    _write_set(root, [[photos[0]], [photos[1]]])
    (root / "00001.parquet").unlink()
    with pytest.raises(ManifestError, match=r"00001\.tar: its index columns .* differ"):
        plan(_job(tmp_path, str(root)))


def test_a_tar_outside_the_allowed_locations_stops_planning(tmp_path, photos):
    root = tmp_path / "wds"
    _write_set(root, [[photos[0]]])
    job = _job(tmp_path, str(root), limits={"allowed_locations": [str(tmp_path / "images") + "/"]})
    with pytest.raises(ManifestError, match=r"tar .*00000\.tar is outside the allowed locations"):
        plan(job)
    job = _job(tmp_path, str(root), limits={"allowed_locations": [str(root) + "/"]})
    assert plan(job).total_rows == 1


def test_webdataset_config_is_validated():
    base = {"output": {"uri": "/o"}, "model": {"visual": "/v", "llm": "/l"}}
    assert parse_job({**base, "input": {"uri": "/m"}}).input.format == "parquet"
    with pytest.raises(JobConfigError, match="format"):
        parse_job({**base, "input": {"uri": "/m", "format": "tar"}})
    with pytest.raises(JobConfigError, match=r"reads the tars named by input\.uri"):
        parse_job({**base, "input": {"images": "/i", "format": "webdataset"}})
    with pytest.raises(JobConfigError, match=r"input\.columns applies to Parquet manifests"):
        parse_job(
            {**base, "input": {"uri": "/m", "format": "webdataset", "columns": {"id": "key"}}}
        )
    with pytest.raises(JobConfigError, match=r"input\.glob applies to input\.images"):
        parse_job({**base, "input": {"uri": "/m", "format": "webdataset", "glob": "*"}})


# -- members: keys, extensions, bad members -------------------------------------------------------


def test_members_keys_extensions_and_bad_members(tmp_path, photos, caplog):
    members = [
        ("a/000.png", photos[1]),  # the same key as a/000.jpg: jpg comes first in the list
        ("a/000.jpg", photos[0]),
        ("a/000.txt", "première légende".encode()),
        ("a/000.seg.png", photos[2]),  # extension seg.png: not an image extension
        ("001.jpg", photos[3]),
        ("001.jpg", photos[4]),  # repeated: the last one wins, as `tar -x` leaves it
        ("001.cls", b"3"),
        ("002.txt", b"a caption whose image is missing"),
        ("003.jpg", b"\xff\xd8 not a jpeg"),
        ("004.json", b"{" + b" " * (webdataset._TEXT_LIMIT + 1)),
        ("004.webp", b""),
    ]
    # A symlink member is never followed: it is not a regular file.
    raw = write_tar(members, links=[("005.jpg", "/etc/hostname")])
    (tmp_path / "set.tar").write_bytes(raw)
    job = _job(tmp_path, str(tmp_path / "set.tar"), output={"rows_per_shard": 10})
    with caplog.at_level("WARNING", logger="ziya_batch"):
        p = plan(job)
    index = pq.read_table(p.files[0]).to_pylist()
    assert [r["id"] for r in index] == ["a/000", "001", "003", "004"]
    by_id = {r["id"]: r for r in index}
    assert by_id["a/000"]["txt"] == "première légende"
    assert by_id["004"]["json"] is None and by_id["004"]["size"] == 0
    logged = caplog.text
    for kind in (
        "second image of a key",
        "repeated member",
        "not a regular file",
        "text without an image",
        "over 1048576 bytes",
        "other member",
    ):
        assert kind in logged, kind
    rows = {r["id"]: r for r in ReadStage.for_job(job)(_shards(p)).to_pylist()}
    assert rows["a/000"]["image_bytes"] == photos[0]
    assert rows["001"]["image_bytes"] == photos[4]
    assert all(r["status"] == "ok" and r["image"] is None for r in rows.values())
    # Broken and empty members fail where every image does: in decoding.
    from pipeline.guards.locations import LocationPolicy
    from pipeline.stages.fetch import FetchStage
    from pipeline.stages.preprocess import PreprocessStage

    fetched = FetchStage.for_job(job, LocationPolicy(), "f")(ReadStage.for_job(job)(_shards(p)))
    done = PreprocessStage(32, job.limits.max_image_pixels, "fast")(fetched).to_pylist()
    assert {r["id"]: r["status"] for r in done} == {
        "a/000": "ok",
        "001": "ok",
        "003": "decode_error",
        "004": "decode_error",
    }


def test_a_truncated_tar_keeps_what_it_holds_and_a_non_tar_stops(tmp_path, photos):
    raw = write_tar([("000.jpg", photos[0]), ("001.jpg", photos[1]), ("002.jpg", photos[2])])
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        cut = tar.getmember("001.jpg").offset_data + 1000  # inside 001.jpg's data
    (tmp_path / "cut.tar").write_bytes(raw[:cut])
    job = _job(tmp_path, str(tmp_path / "cut.tar"))
    p = plan(job)
    index = pq.read_table(p.files[0])
    assert index.column("id").to_pylist() == ["000", "001"]
    assert index.column("size").to_pylist() == [len(photos[0]), 1000]
    rows = ReadStage.for_job(job)(_shards(p)).to_pylist()
    assert rows[0]["image_bytes"] == photos[0] and rows[1]["image_bytes"] == photos[1][:1000]
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar" * 100)
    with pytest.raises(ManifestError, match=r"junk\.tar is not a readable tar"):
        plan(_job(tmp_path, str(tmp_path / "junk.tar")))


# -- reading: one range read per shard, statuses ----------------------------------------------------


def test_a_shard_is_one_range_read_and_large_members_are_never_read(tmp_path, photos, monkeypatch):
    root = tmp_path / "wds"
    big = b"\xff\xd8" + os.urandom(300_000)  # over the limit below; never read
    assert all(len(p) < 250_000 for p in photos[:4])
    _write_set(root, [[photos[0], photos[1], big, photos[2], None, photos[3]]])
    # The sidecar says success for a key the tar lacks: no image member, source_failed too.
    side = pq.read_table(root / "00000.parquet").to_pylist()
    side.append({**side[0], "key": "000000099"})
    pq.write_table(pa.Table.from_pylist(side, schema=SIDECAR_SCHEMA), root / "00000.parquet")
    job = _job(
        tmp_path,
        str(root),
        output={"rows_per_shard": 10},
        limits={"max_image_bytes": 250_000},
    )
    p = plan(job)
    assert len(p.shards) == 1
    reads: list[tuple[int, int]] = []
    real = webdataset._read_range

    def counted(uri, start, end, storage):
        reads.append((start, end))
        return real(uri, start, end, storage)

    monkeypatch.setattr(webdataset, "_read_range", counted)
    rows = {r["id"]: r for r in ReadStage.for_job(job)(_shards(p)).to_pylist()}
    index = {r["id"]: r for r in pq.read_table(p.files[0]).to_pylist()}
    assert {k: r["status"] for k, r in rows.items()} == {
        "000000000": "ok",
        "000000001": "ok",
        "000000002": "too_large",
        "000000003": "ok",
        "000000004": "source_failed",
        "000000005": "ok",
        "000000099": "source_failed",
    }
    assert "300002 bytes > limit 250000" in rows["000000002"]["error"]
    assert "failed_to_download" in rows["000000004"]["error"]
    assert "no image member" in rows["000000099"]["error"]
    for k, photo in zip(
        ["000000000", "000000001", "000000003", "000000005"], photos[:4], strict=True
    ):
        assert rows[k]["image_bytes"] == photo
    # Two range reads: the span is cut around the too-large member, which no read covers.
    big_at = index["000000002"]["offset"]
    assert len(reads) == 2
    assert all(end <= big_at or start >= big_at + len(big) for start, end in reads)
    # Without the large member in the way, the whole shard is one read.
    reads.clear()
    job = _job(tmp_path, str(root), output={"rows_per_shard": 10})
    ReadStage.for_job(job)(_shards(plan(job)))
    assert len(reads) == 1
    # retry_failed reads only the rows asked for.
    reads.clear()
    s = plan(job).shards[0]
    batch = pa.Table.from_pylist(
        [{"shard_id": s.shard_id, "path": s.path, "start": s.start, "end": s.end, "rows": [3]}]
    )
    again = ReadStage.for_job(job)(batch).to_pylist()
    assert [r["id"] for r in again] == ["000000003"] and again[0]["image_bytes"] == photos[2]
    assert reads == [(index["000000003"]["offset"], index["000000003"]["offset"] + len(photos[2]))]


def test_a_replaced_tar_is_a_fetch_error_not_wrong_bytes(tmp_path, photos):
    root = tmp_path / "wds"
    _write_set(root, [[photos[0], photos[1]]])
    job = _job(tmp_path, str(root))
    p = plan(job)
    (root / "00000.tar").write_bytes(write_tar([("x.jpg", b"short")]))
    rows = ReadStage.for_job(job)(_shards(p)).to_pylist()
    assert [r["status"] for r in rows] == ["fetch_error", "fetch_error"]
    assert "shorter than its index says" in rows[0]["error"]
    (root / "00000.tar").unlink()
    rows = ReadStage.for_job(job)(_shards(p)).to_pylist()
    assert {r["status"] for r in rows} == {"fetch_error"} and "FileNotFoundError" in rows[0][
        "error"
    ]


def test_a_key_in_two_tars_is_a_repeated_id(tmp_path, photos):
    """Ids are what the output is joined on: a key in two tars stops the job before model work."""
    root = tmp_path / "wds"
    root.mkdir()
    (root / "a.tar").write_bytes(write_tar([("k1.jpg", photos[0]), ("k2.jpg", photos[1])]))
    (root / "b.tar").write_bytes(write_tar([("k2.jpg", photos[2])]))
    with pytest.raises(ManifestError, match=r"'k2' \(x2\) in .*/wds/a\.tar, .*/wds/b\.tar$"):
        plan(_job(tmp_path, str(root)))


# -- end to end on local Ray + moto S3 ------------------------------------------------------------


@pytest.mark.slow
def test_webdataset_end_to_end_with_resume(
    ray_cluster, moto_endpoint, photo_dir, tiny_checkpoint, tmp_path
):
    from pipeline.builder import run
    from pipeline.output import layout
    from pipeline.output.layout import read_output
    from pipeline.runtime.weights import ModelLoader
    from tests.support import s3
    from tests.support.counting import CountingLoader, answered_rows
    from tests.support.fault_jobs import listing, make_job

    bucket = "wds-e2e"
    s3.create_bucket(moto_endpoint, bucket)
    photos = [p.read_bytes() for p in sorted(photo_dir.glob("*.jpg"))]
    broken = b"\x89PNG\r\n\x1a\n not really a png"
    sets = [
        [photos[0], None, photos[1]],  # a failed download, in the sidecar only
        [photos[2], broken],  # a member that is no image
        [photos[3], photos[4], None],
    ]
    expected: dict[str, tuple[str, str | None]] = {}  # id -> (status, txt)
    for n, items in enumerate(sets):
        tar, sidecar = img2dataset_shard(n, items)
        s3.put_bytes(moto_endpoint, bucket, f"laion/{n:05d}.tar", tar)
        buf = io.BytesIO()
        pq.write_table(sidecar, buf)
        s3.put_bytes(moto_endpoint, bucket, f"laion/{n:05d}.parquet", buf.getvalue())
        for i, item in enumerate(items):
            key = f"{n:05d}{i:04d}"
            status = "source_failed" if item is None else "decode_error" if item is broken else "ok"
            expected[key] = (status, None if item is None else f"caption {key}")
    job = make_job(
        moto_endpoint,
        bucket,
        tiny_checkpoint,
        "laion/",
        "out/wds",
        rows_per_shard=2,
        input={"format": "webdataset"},
    )
    log1 = tmp_path / "run1.jsonl"
    first = run(job, loader=CountingLoader(ModelLoader(job), str(log1)))
    out = read_output(job.output.uri, job.storage)
    ids = out.column("id").to_pylist()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids)) == first.rows_in == 8
    rows = {r["id"]: r for r in out.to_pylist()}
    assert {k: r["status"] for k, r in rows.items()} == {k: v[0] for k, v in expected.items()}
    assert Counter(r["status"] for r in rows.values()) == {
        "ok": 5,
        "source_failed": 2,
        "decode_error": 1,
    }
    assert answered_rows(log1) == 5
    # The texts, the JSON and the sidecar's columns pass through; the index's bookkeeping and
    # the sidecar's status (the output's status says it) do not.
    assert {"tar", "offset", "size", "key"}.isdisjoint(out.column_names)
    for k, r in rows.items():
        assert r["txt"] == expected[k][1]
        assert (r["json"] is None) == (expected[k][0] == "source_failed")
        assert r["url"] == f"https://example.com/{k}.jpg"
        assert r["caption"] == f"caption {k}"
        assert (r["answer"] is not None) == (r["status"] == "ok")
    assert json.loads(rows["000000002"]["json"])["width"] == 64
    assert rows["000000001"]["error_message"] == "HTTP Error 404: Not Found"
    assert "failed_to_download" in rows["000000001"]["error"]
    assert rows["000010001"]["width"] == 64  # the broken member's sidecar row, all the same
    indexes = s3.list_keys(moto_endpoint, bucket, "out/wds/_input/webdataset/")
    assert len(indexes) == 3

    # Take the second tar's shard out of the output: a resume redoes only that shard.
    p = plan(job)
    (lost,) = [s.shard_id for s in p.shards if s.path.split("/")[-1].startswith("00001-")]
    layout.uncommit(job.output.uri, [lost], job.storage)
    before = listing(moto_endpoint, bucket, "out/wds/")
    log2 = tmp_path / "run2.jsonl"
    second = run(job, loader=CountingLoader(ModelLoader(job), str(log2)))
    assert second.rows_in == 2 and answered_rows(log2) == 1  # 000010000; 000010001 fails decode
    assert second.shards_committed == 1 and second.shards_skipped == len(p.shards) - 1
    after = listing(moto_endpoint, bucket, "out/wds/")
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed and all(
        lost in k or k.endswith(("_SUCCESS", "summary.json")) or "/_staging/" in k for k in changed
    ), changed
    assert s3.list_keys(moto_endpoint, bucket, "out/wds/_input/webdataset/") == indexes
    again = read_output(job.output.uri, job.storage)
    assert sorted(again.column("id").to_pylist()) == sorted(expected)
    assert {r["id"]: r["status"] for r in again.to_pylist()} == {
        k: v[0] for k, v in expected.items()
    }
