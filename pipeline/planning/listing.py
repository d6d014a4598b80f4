"""Images without a manifest (`input.images`): list a prefix, write the listing as the run's manifest.

    plan = plan_images(job)   # a ManifestPlan over OUT/_input/manifest-*.parquet

The prefix (s3://, gs:// or a local directory) is listed recursively in key order (S3 returns
keys sorted; a local directory is walked with each level's entries sorted the same way), so
the listing is deterministic. Objects whose name ends in one of `input.image_extensions` and
that match `input.glob` become rows: `id` (the key relative to the prefix), `image` (its URI),
`size` and `version` (ETag, or size:mtime locally). The rows are written in chunks of
`_chunk_rows` (a whole number of shards) as `OUT/_input/manifest-<n>-<digest>.parquet`, named by
their keys: an unchanged listing is not written again (a finished job's rerun writes nothing);
a chunk whose keys changed (an object added or removed) gets a new name, so its shards get new
ids (resume refuses an output planned from another listing); an object replaced in place keeps
the chunk's name and shards, and the file is rewritten with its new size and version (so
retry_failed relabels a broken image once it is fixed, as for a manifest's image replaced under
its URI). Either way the listing files change, so incremental runs get a new run id and label
only the new or changed images. The driver holds one chunk at a time plus the shard list, never
the whole listing.
Readers of the output skip `_input` (a leading underscore, as Parquet datasets do).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import posixpath
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import JobConfig
from pipeline.output.layout import exists, table_to_parquet_bytes, write_bytes_atomic
from pipeline.planning.manifest import ManifestError, ManifestPlan, Shard, shard_id
from pipeline.storage import filesystem, is_remote, join, protocol_of

log = logging.getLogger("ziya_batch")

INPUT_DIR = "_input"
LISTING_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.string()),
        ("size", pa.int64()),
        ("version", pa.string()),
    ]
)
# Listing rows per manifest file (rounded up to whole shards): bounds the driver's memory.
LISTING_CHUNK_ROWS = 100_000
_PAGE = 1000  # objects pulled from the store per call
# Parquet metadata key of a listing file: the digest of its rows' sizes and versions.
_CONTENT_KEY = "ziya.listing_content"


def _chunk_rows(rows_per_shard: int) -> int:
    return -(-LISTING_CHUNK_ROWS // rows_per_shard) * rows_per_shard


def iter_objects(uri: str, storage: Any) -> Iterator[tuple[str, int, str]]:
    """(key relative to `uri`, size, version) of every object under the prefix, in key order."""
    fs, root = filesystem(uri, storage)
    root = root.rstrip("/")
    proto = protocol_of(uri)
    if proto in ("s3", "s3a"):
        yield from _iter_s3(fs, root)
    elif not is_remote(uri):
        if not os.path.isdir(root):
            raise ManifestError(f"input.images {uri} is not a directory")
        yield from _iter_local(root, "")
    else:
        # gs:// and others: fsspec's find (one listing held in memory), sorted.
        for path, info in sorted(fs.find(root, detail=True).items()):
            rel = path[len(root) + 1 :]
            version = str(info.get("etag") or info.get("md5Hash") or info.get("mtime") or "")
            yield rel, int(info.get("size") or 0), version


def _iter_s3(fs: Any, root: str) -> Iterator[tuple[str, int, str]]:
    """Page by page through ListObjectsV2 without a delimiter: all keys under the prefix, sorted
    by S3 itself, `_PAGE` at a time in the driver."""
    from fsspec.asyn import sync

    bucket, _, prefix = root.partition("/")
    prefix = prefix + "/" if prefix else ""
    pages = fs._iterdir(bucket, delimiter="", prefix=prefix)

    async def take() -> list[dict]:
        out: list[dict] = []
        async for item in pages:
            out.append(item)
            if len(out) >= _PAGE:
                break
        return out

    strip = len(bucket) + 1 + len(prefix)
    while True:
        items = sync(fs.loop, take)
        if not items:
            return
        for item in items:
            if item.get("type") == "directory" or item["Key"].endswith("/"):
                continue
            yield item["Key"][strip:], int(item["Size"]), str(item.get("ETag", "")).strip('"')


def _iter_local(root: str, rel: str) -> Iterator[tuple[str, int, str]]:
    """Depth-first, each directory's entries sorted with directories as `name/`: the order of the
    full relative keys, as S3 lists them. Symlinks are listed as files (the fetch stage's policy
    check resolves them)."""
    with os.scandir(os.path.join(root, rel) if rel else root) as it:
        entries = [(e.name + ("/" if e.is_dir(follow_symlinks=False) else ""), e) for e in it]
    for name, entry in sorted(entries, key=lambda x: x[0].encode("utf-8", "surrogateescape")):
        key = posixpath.join(rel, entry.name) if rel else entry.name
        if name.endswith("/"):
            yield from _iter_local(root, key)
        else:
            st = entry.stat(follow_symlinks=False)
            yield key, st.st_size, f"{st.st_size}:{st.st_mtime_ns}"


def _content_of(uri: str, storage: Any) -> str | None:
    """The content digest an existing listing file was written with (None: no such file)."""
    if not exists(uri, storage):
        return None
    fs, path = filesystem(uri, storage)
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    return meta.get(_CONTENT_KEY.encode(), b"").decode() or None


def plan_images(job: JobConfig) -> ManifestPlan:
    """List `input.images`, write the listing under OUT/_input/, and plan shards over it."""
    images = job.input.images
    assert images is not None, "plan_images needs input.images"
    storage = job.storage
    base = images.rstrip("/")
    extensions = tuple("." + e.lower().lstrip(".") for e in job.input.image_extensions)
    pattern = job.input.glob
    step = job.output.rows_per_shard
    chunk_rows = _chunk_rows(step)
    files: list[str] = []
    shards: list[Shard] = []
    total = skipped = 0
    t0 = time.time()
    chunk: list[tuple[str, int, str]] = []

    def flush() -> None:
        nonlocal chunk
        if not chunk:
            return
        ids, sizes, versions = zip(*chunk, strict=True)
        table = pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "image": pa.array([f"{base}/{k}" for k in ids], pa.string()),
                "size": pa.array(sizes, pa.int64()),
                "version": pa.array(versions, pa.string()),
            },
            schema=LISTING_SCHEMA,
        )
        # Named by the keys, so the plan's shards stay the same while the same objects are
        # listed (an object replaced in place, e.g. a broken image fixed for retry_failed); the
        # sizes and versions are the file's content, recorded in its metadata and rewritten
        # when they changed.
        names = hashlib.sha1(base.encode())
        content = hashlib.sha1()
        for k, s, v in chunk:
            names.update(f"\0{k}".encode("utf-8", "surrogateescape"))
            content.update(f"\0{s}\0{v}".encode("utf-8", "surrogateescape"))
        name = f"manifest-{len(files):05d}-{names.hexdigest()[:12]}.parquet"
        uri = join(job.output.uri, INPUT_DIR, name)
        if _content_of(uri, storage) != content.hexdigest():
            table = table.replace_schema_metadata({_CONTENT_KEY: content.hexdigest()})
            write_bytes_atomic(uri, table_to_parquet_bytes(table), storage)
        for start in range(0, len(chunk), step):
            end = min(len(chunk), start + step)
            shards.append(Shard(shard_id(uri, start, end), uri, start, end))
        files.append(uri)
        chunk = []

    for key, size, version in iter_objects(images, storage):
        if not key.lower().endswith(extensions) or (
            pattern is not None and not fnmatch.fnmatchcase(key, pattern)
        ):
            skipped += 1
            continue
        chunk.append((key, size, version))
        total += 1
        if len(chunk) >= chunk_rows:
            flush()
    flush()
    if not files:
        raise ManifestError(
            f"input.images {images} holds no images ({skipped} objects, none ending in "
            f"{', '.join(extensions)}{' and matching ' + pattern if pattern else ''})"
        )
    log.info(
        "listed %d images (%d other objects skipped) under %s in %.1fs: %d listing files",
        total,
        skipped,
        images,
        time.time() - t0,
        len(files),
    )
    return ManifestPlan(
        files=files,
        shards=shards,
        total_rows=total,
        schema=LISTING_SCHEMA,
        columns={"id": "id", "image": "image"},
        sources=[base + "/"],
        ids_checked=True,  # keys of one listing are unique by construction
    )
