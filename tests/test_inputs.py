"""Inputs as users have them: column mapping (`input.columns`).

Unit tests call the planner and the read stage directly (no Ray); the end-to-end test runs on a
real local Ray with moto S3 over HTTP: an img2dataset-style Parquet set (`key`, `jpg` bytes,
`status`) and a manifest with its own names (`uid`, `url`).

Run: .venv/bin/python -m pytest tests/test_inputs.py -q
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfigError, parse_job
from pipeline.planning.manifest import ManifestError, plan, read_rows
from pipeline.stages.read import ReadStage


def _job(tmp_path: Path, manifest: Path | str, **over):
    data = {
        "input": {"uri": str(manifest)},
        "output": {"uri": str(tmp_path / "out"), "rows_per_shard": 2},
        "task": {"kind": "caption"},
        "model": {"visual": "/m/visual", "llm": "/m/llm"},
    }
    data.update(over)
    return parse_job(data)


def img2dataset_parquet(photos: list[bytes]) -> pa.Table:
    """A shard of img2dataset's `parquet` output format: one row per URL it tried, the image
    bytes in `jpg` (null when the download failed), its metadata beside them."""
    n = len(photos) + 1
    return pa.table(
        {
            "key": [f"{i:09d}" for i in range(n)],
            "jpg": pa.array([*photos, None], pa.binary()),
            "txt": [f"caption {i}" for i in range(n)],
            "url": [f"https://example.com/{i}.jpg" for i in range(n)],
            "width": pa.array([64] * (n - 1) + [None], pa.int64()),
            "status": ["success"] * (n - 1) + ["failed_to_download"],
            "error_message": [None] * (n - 1) + ["HTTP Error 404: Not Found"],
        }
    )


IMG2DATASET = {"id": "key", "image_bytes": "jpg", "source_status": "status"}


def test_mapped_columns_are_read_by_role_and_pass_through_by_name(tmp_path, photo_dir):
    photos = [p.read_bytes() for p in sorted(photo_dir.glob("*.jpg"))[:2]]
    pq.write_table(img2dataset_parquet(photos), tmp_path / "00000.parquet")
    job = _job(
        tmp_path,
        tmp_path / "00000.parquet",
        input={"uri": str(tmp_path / "00000.parquet"), "columns": IMG2DATASET},
    )
    p = plan(job)
    assert p.total_rows == 3 and len(p.shards) == 2
    # The user's names pass through (the id column under its own name too); the bytes and
    # img2dataset's status do not (the output's status says source_failed).
    assert p.passthrough_columns == ["key", "txt", "url", "width", "error_message"]
    shards = pa.Table.from_pylist(
        [{"shard_id": s.shard_id, "path": s.path, "start": s.start, "end": s.end} for s in p.shards]
    )
    rows = ReadStage.for_job(job)(shards).to_pylist()
    assert [r["id"] for r in rows] == ["000000000", "000000001", "000000002"]
    assert [r["image_bytes"] for r in rows[:2]] == photos
    assert [r["status"] for r in rows] == ["ok", "ok", "source_failed"]
    assert rows[2]["image_bytes"] is None and "failed_to_download" in rows[2]["error"]
    # The writer's re-read: the file's own names.
    back = read_rows(p.shards[0], job.storage, columns=p.passthrough_columns)
    assert back.column_names == ["key", "txt", "url", "width", "error_message", "row"]


def test_a_mapping_to_a_missing_column_names_the_file_and_its_columns(tmp_path):
    pq.write_table(pa.table({"uid": ["a"], "url": ["s3://b/a.jpg"]}), tmp_path / "m.parquet")
    job = _job(
        tmp_path,
        tmp_path / "m.parquet",
        input={"uri": str(tmp_path / "m.parquet"), "columns": {"id": "uid", "image": "path"}},
    )
    with pytest.raises(
        ManifestError, match=r"m.parquet: input.columns maps image -> 'path'.*\['uid', 'url'\]"
    ):
        plan(job)


def test_mapped_integer_ids_become_strings_and_must_be_unique(tmp_path):
    pq.write_table(
        pa.table({"uid": [7, 8], "url": ["s3://b/a", "s3://b/b"]}), tmp_path / "m.parquet"
    )
    cols = {"id": "uid", "image": "url"}
    job = _job(
        tmp_path,
        tmp_path / "m.parquet",
        input={"uri": str(tmp_path / "m.parquet"), "columns": cols},
    )
    p = plan(job)
    assert p.passthrough_columns == ["uid", "url"]
    rows = read_rows(p.shards[0], job.storage, columns=["id", "image"], mapping=cols)
    assert rows.column("id").to_pylist() == ["7", "8"]
    assert rows.column("image").to_pylist() == ["s3://b/a", "s3://b/b"]
    pq.write_table(
        pa.table({"uid": [7, 7], "url": ["s3://b/a", "s3://b/b"]}), tmp_path / "d.parquet"
    )
    with pytest.raises(ManifestError, match=r"column 'uid' must be unique.*'7' \(x2\)"):
        plan(_job(tmp_path, "", input={"uri": str(tmp_path / "d.parquet"), "columns": cols}))


def test_a_column_the_output_owns_is_not_hidden_by_a_mapping(tmp_path):
    table = pa.table({"id": ["x"], "key": ["k"], "image": ["s3://b/a"]})
    pq.write_table(table, tmp_path / "m.parquet")
    job = _job(tmp_path, "", input={"uri": str(tmp_path / "m.parquet"), "columns": {"id": "key"}})
    with pytest.raises(ManifestError, match=r"also has a column 'id'"):
        plan(job)
    # Wrong types are named by the user's column, the mapping shown.
    pq.write_table(pa.table({"key": ["k"], "url": [3]}), tmp_path / "t.parquet")
    job = _job(
        tmp_path,
        "",
        input={"uri": str(tmp_path / "t.parquet"), "columns": {"id": "key", "image": "url"}},
    )
    with pytest.raises(
        ManifestError, match=r"t.parquet \(input.columns .*'image' must be a string"
    ):
        plan(job)


def test_mapping_config_is_typed():
    base = {"output": {"uri": "/o"}, "model": {"visual": "/v", "llm": "/l"}}
    with pytest.raises(JobConfigError, match="columns"):
        parse_job({**base, "input": {"uri": "/m", "columns": {"ident": "key"}}})
    with pytest.raises(JobConfigError, match="maps both 'id' and 'image' to column 'k'"):
        parse_job({**base, "input": {"uri": "/m", "columns": {"id": "k", "image": "k"}}})


# -- end to end on local Ray + moto S3 ---------------------------------------------------------


@pytest.fixture(scope="module")
def bucket(moto_endpoint, photo_dir):
    from tests.support.fault_jobs import seed_bucket

    return seed_bucket(moto_endpoint, "inputs-e2e", photo_dir)


def _put_table(endpoint: str, bucket: str, key: str, table: pa.Table) -> None:
    from tests.support import s3

    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=2)
    s3.put_bytes(endpoint, bucket, key, buf.getvalue())


@pytest.mark.slow
def test_img2dataset_parquet_and_own_names_end_to_end(
    ray_cluster, moto_endpoint, bucket, photo_dir, tiny_checkpoint
):
    from pipeline.builder import run
    from pipeline.output.layout import read_output
    from tests.support.fault_jobs import make_job, photo_uris

    photos = [p.read_bytes() for p in sorted(photo_dir.glob("*.jpg"))[:3]]
    shard0 = img2dataset_parquet([photos[0], photos[1]])
    shard1 = img2dataset_parquet([photos[2], b"\xff\xd8 not a jpeg"])
    shard1 = shard1.set_column(0, "key", pa.array([f"1{i:08d}" for i in range(3)]))
    _put_table(moto_endpoint, bucket, "i2d/00000.parquet", shard0)
    _put_table(moto_endpoint, bucket, "i2d/00001.parquet", shard1)
    job = make_job(
        moto_endpoint,
        bucket,
        tiny_checkpoint,
        "i2d/",
        "out/i2d",
        rows_per_shard=2,
        input={"columns": IMG2DATASET},
    )
    summary = run(job)
    out = read_output(job.output.uri, job.storage)
    assert out.num_rows == 6 == summary.rows_in
    rows = {r["id"]: r for r in out.to_pylist()}
    assert sorted(rows) == sorted(shard0["key"].to_pylist() + shard1["key"].to_pylist())
    assert Counter(r["status"] for r in rows.values()) == {
        "ok": 3,
        "decode_error": 1,
        "source_failed": 2,
    }
    assert "jpg" not in out.column_names and "status" in out.column_names
    for r in rows.values():
        assert r["key"] == r["id"]  # the user's id column, under its own name
        assert r["txt"] == f"caption {int(r['id']) % 10}"
        assert (r["answer"] is not None) == (r["status"] == "ok")
    assert rows["000000002"]["error_message"] == "HTTP Error 404: Not Found"
    assert rows["000000002"]["status"] == "source_failed"
    assert rows["100000001"]["status"] == "decode_error"

    # A manifest with its own names for the id and the image URI.
    uris = [*photo_uris(bucket, photo_dir)[:3], f"s3://{bucket}/images/missing.jpg"]
    own = pa.table({"uid": [10, 11, 12, 13], "url": uris, "caption": ["a", "b", "c", "d"]})
    _put_table(moto_endpoint, bucket, "own/m.parquet", own)
    job = make_job(
        moto_endpoint,
        bucket,
        tiny_checkpoint,
        "own/m.parquet",
        "out/own",
        input={"columns": {"id": "uid", "image": "url"}},
    )
    run(job)
    out = read_output(job.output.uri, job.storage)
    assert out.column_names[:4] == ["id", "uid", "url", "caption"]
    assert out.schema.field("uid").type == pa.int64()
    rows = {r["id"]: r for r in out.to_pylist()}
    assert sorted(rows) == ["10", "11", "12", "13"]
    assert [rows[k]["url"] for k in sorted(rows)] == uris
    assert Counter(r["status"] for r in rows.values()) == {"ok": 3, "fetch_error": 1}


# -- images without a manifest (input.images) ---------------------------------------------------


def _tree(root: Path, photo: bytes) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "b.jpg").write_bytes(photo)
    (root / "a.PNG").write_bytes(photo)
    (root / "sub" / "c.jpeg").write_bytes(photo)
    (root / "sub" / "deeper" / "d.jpg").write_bytes(photo)
    (root / "sub.jpg").write_bytes(b"not an image")
    (root / "notes.txt").write_text("not listed")


def test_images_are_listed_sorted_and_written_as_the_runs_manifest(tmp_path, photo_dir):
    from pipeline.builder import default_policy
    from pipeline.stages.fetch import FetchStage

    photo = sorted(photo_dir.glob("*.jpg"))[0].read_bytes()
    root = tmp_path / "photos"
    _tree(root, photo)
    (root / "evil.jpg").symlink_to("/etc/hostname")
    job = _job(tmp_path, "", input={"images": str(root) + "/"}, limits={})
    p = plan(job)
    # Key order (as S3 lists it): 'sub.jpg' < 'sub/...' since '.' < '/'.
    ids = ["a.PNG", "b.jpg", "evil.jpg", "sub.jpg", "sub/c.jpeg", "sub/deeper/d.jpg"]
    assert p.total_rows == 6 and len(p.shards) == 3
    assert p.files[0].startswith(str(tmp_path / "out" / "_input" / "manifest-00000-"))
    listing = pq.read_table(p.files[0])
    assert listing.column("id").to_pylist() == ids
    assert listing.column("image").to_pylist() == [f"{root}/{k}" for k in ids]
    assert p.passthrough_columns == ["image", "size", "version"]
    # Rows read and fetched as a manifest's would be, under the same location policy: the
    # symlink out of the directory is refused without being read.
    policy = default_policy(job, p.sources)
    shards = pa.Table.from_pylist(
        [{"shard_id": s.shard_id, "path": s.path, "start": s.start, "end": s.end} for s in p.shards]
    )
    fetched = FetchStage.for_job(job, policy, "f")(ReadStage.for_job(job)(shards)).to_pylist()
    status = {r["id"]: r["status"] for r in fetched}
    assert status["evil.jpg"] == "invalid_path" and status["b.jpg"] == "ok"
    # The same listing again is not written again; a new object makes a new listing file.
    before = {f: Path(f).stat().st_mtime_ns for f in p.files}
    assert plan(job).files == p.files and {f: Path(f).stat().st_mtime_ns for f in p.files} == before
    # An object replaced in place (a broken image fixed): the same files and shards, the file
    # rewritten with the object's new size.
    (root / "b.jpg").write_bytes(photo + b"\0")
    replaced = plan(job)
    assert replaced.files == p.files and replaced.shards == p.shards
    size = {r["id"]: r["size"] for r in pq.read_table(p.files[0]).to_pylist()}
    assert size["b.jpg"] == len(photo) + 1
    (root / "sub" / "e.jpg").write_bytes(photo)
    again = plan(job)
    assert again.total_rows == 7 and again.files != p.files
    assert {s.shard_id for s in again.shards}.isdisjoint({s.shard_id for s in p.shards})


def test_images_glob_extensions_and_chunks(tmp_path, photo_dir, monkeypatch):
    from pipeline.planning import listing

    photo = sorted(photo_dir.glob("*.jpg"))[0].read_bytes()
    root = tmp_path / "photos"
    _tree(root, photo)
    job = _job(tmp_path, "", input={"images": str(root), "glob": "sub/*"})
    assert pq.read_table(plan(job).files[0]).column("id").to_pylist() == [
        "sub/c.jpeg",
        "sub/deeper/d.jpg",
    ]
    job = _job(tmp_path, "", input={"images": str(root), "image_extensions": ["txt"]})
    assert pq.read_table(plan(job).files[0]).column("id").to_pylist() == ["notes.txt"]
    # Listing files of a whole number of shards each (2 rows a shard -> 4 a file here).
    monkeypatch.setattr(listing, "LISTING_CHUNK_ROWS", 3)
    p = plan(_job(tmp_path, "", input={"images": str(root)}))
    assert [pq.read_metadata(f).num_rows for f in p.files] == [4, 1]
    assert [(s.start, s.end) for s in p.shards] == [(0, 2), (2, 4), (0, 1)]
    with pytest.raises(ManifestError, match=r"holds no images \(6 objects"):
        plan(_job(tmp_path, "", input={"images": str(root), "image_extensions": ["gif"]}))
    base = {"output": {"uri": "/o"}, "model": {"visual": "/v", "llm": "/l"}}
    with pytest.raises(JobConfigError, match=r"exactly one of input\.uri"):
        parse_job({**base, "input": {"uri": "/m", "images": "/i"}})


@pytest.mark.slow
def test_images_prefix_end_to_end_incremental(
    ray_cluster, moto_endpoint, bucket, photo_dir, tiny_checkpoint, tmp_path
):
    """A prefix with a nested prefix, a non-image object and a broken image; an object added
    before an incremental rerun is the only one labeled."""
    from pipeline.builder import run
    from pipeline.output.layout import read_output
    from pipeline.runtime.weights import ModelLoader
    from tests.support import s3
    from tests.support.counting import CountingLoader, answered_rows
    from tests.support.fault_jobs import make_job

    photos = sorted(photo_dir.glob("*.jpg"))
    s3.upload_file(moto_endpoint, photos[0], bucket, "photos/a.jpg")
    s3.upload_file(moto_endpoint, photos[1], bucket, "photos/nested/deeper/b.jpg")
    s3.upload_file(moto_endpoint, photos[2], bucket, "photos/nested/c.JPG")
    s3.put_bytes(moto_endpoint, bucket, "photos/broken.jpg", b"\xff\xd8 truncated")
    s3.put_bytes(moto_endpoint, bucket, "photos/nested/meta.json", b"{}")
    s3.upload_file(moto_endpoint, photos[3], bucket, "photos-other/x.jpg")  # not under photos/

    def job_for():
        data = make_job(moto_endpoint, bucket, tiny_checkpoint, "unused", "out/photos", 2)
        return data.model_copy(
            update={
                "input": data.input.model_copy(
                    update={"uri": None, "images": f"s3://{bucket}/photos/"}
                ),
                "run": data.run.model_copy(update={"mode": "incremental"}),
            }
        )

    job = job_for()
    log1 = tmp_path / "run1.jsonl"
    first = run(job, loader=CountingLoader(ModelLoader(job), str(log1)))
    out = read_output(job.output.uri, job.storage)
    rows = {r["id"]: r for r in out.to_pylist()}
    assert sorted(rows) == ["a.jpg", "broken.jpg", "nested/c.JPG", "nested/deeper/b.jpg"]
    assert Counter(r["status"] for r in rows.values()) == {"ok": 3, "decode_error": 1}
    assert rows["a.jpg"]["image"] == f"s3://{bucket}/photos/a.jpg"
    assert first.rows_in == 4 and answered_rows(log1) == 3
    listing = s3.client(moto_endpoint).list_objects_v2(Bucket=bucket, Prefix="out/photos/_input/")
    assert len(listing["Contents"]) == 1

    s3.upload_file(moto_endpoint, photos[4], bucket, "photos/nested/new.jpg")
    log2 = tmp_path / "run2.jsonl"
    second = run(job, loader=CountingLoader(ModelLoader(job), str(log2)))
    assert answered_rows(log2) == 1  # only the new object reached the model
    assert second.statuses.get("ok") == 1
    out = read_output(job.output.uri, job.storage)
    ids = out.column("id").to_pylist()
    assert sorted(ids) == sorted([*rows, "nested/new.jpg"]) and len(ids) == len(set(ids))


@pytest.mark.slow
def test_images_prefix_retry_failed_after_the_object_is_fixed(
    ray_cluster, moto_endpoint, bucket, photo_dir, tiny_checkpoint, tmp_path
):
    """A broken image under the prefix fails; once it is replaced in the bucket, retry_failed
    relabels only it, in place, and leaves every other shard as it was."""
    from pipeline.builder import run
    from pipeline.output.layout import read_output
    from pipeline.runtime.weights import ModelLoader
    from tests.support import s3
    from tests.support.counting import CountingLoader, answered_rows
    from tests.support.fault_jobs import listing, make_job

    photos = sorted(photo_dir.glob("*.jpg"))
    s3.upload_file(moto_endpoint, photos[0], bucket, "retry/a.jpg")
    s3.put_bytes(moto_endpoint, bucket, "retry/b.jpg", b"\xff\xd8 truncated")
    s3.upload_file(moto_endpoint, photos[1], bucket, "retry/c/d.jpg")
    s3.upload_file(moto_endpoint, photos[2], bucket, "retry/e.jpg")

    def job_for(mode: str):
        data = make_job(moto_endpoint, bucket, tiny_checkpoint, "unused", "out/retry", 2)
        return data.model_copy(
            update={
                "input": data.input.model_copy(
                    update={"uri": None, "images": f"s3://{bucket}/retry/"}
                ),
                "run": data.run.model_copy(update={"mode": mode}),
            }
        )

    job = job_for("resume")
    run(job)
    first = {r["id"]: r for r in read_output(job.output.uri, job.storage).to_pylist()}
    assert {k: r["status"] for k, r in first.items()} == {
        "a.jpg": "ok",
        "b.jpg": "decode_error",
        "c/d.jpg": "ok",
        "e.jpg": "ok",
    }
    before = listing(moto_endpoint, bucket, "out/retry/shards/")

    s3.upload_file(moto_endpoint, photos[3], bucket, "retry/b.jpg")  # the fix
    log = tmp_path / "retry.jsonl"
    job = job_for("retry_failed")
    summary = run(job, loader=CountingLoader(ModelLoader(job), str(log)))
    assert answered_rows(log) == 1 and summary.rows_in == 1
    after = {r["id"]: r for r in read_output(job.output.uri, job.storage).to_pylist()}
    assert sorted(after) == sorted(first)
    assert {k: r["status"] for k, r in after.items()} == dict.fromkeys(first, "ok")
    assert after["b.jpg"]["answer"] and after["b.jpg"]["size"] == photos[3].stat().st_size
    for k in ("a.jpg", "c/d.jpg", "e.jpg"):
        assert (
            after[k]["answer"] == first[k]["answer"] and after[k]["row_key"] == first[k]["row_key"]
        )
    # Only the shard holding b.jpg was rewritten.
    changed = {
        k
        for k, v in listing(moto_endpoint, bucket, "out/retry/shards/").items()
        if before.get(k) != v
    }
    assert changed and all("-000000000-000000002" in k for k in changed), changed
