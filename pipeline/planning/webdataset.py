"""WebDataset input (`input.format: webdataset`): index each tar once, then plan it as Parquet.

    plan = plan_webdataset(job)        # a WebDatasetPlan over OUT/_input/webdataset/*.parquet
    rows = read_rows(shard, job)       # a shard's rows with their image bytes (the read stage)

`input.uri` names the tars: a prefix or directory (listed recursively, sorted; `.tar` files
only), one tar, or a list. A member `dir/000123.jpg` has the key `dir/000123` (the member path up
to the first dot of its file name, as WebDataset splits it) and the extension `jpg`; members whose
extension is one of `input.image_extensions` are the images, `{key}.txt` becomes the string column
`txt` and `{key}.json` the column `json` (its text, as stored), both passed through to the
output. img2dataset writes a sidecar `{shard}.parquet` beside each `{shard}.tar` (key, status,
url, caption, error_message, width, ...): when present it is joined by key, its columns pass
through, its `status` is the row's source status (not `success`: `source_failed`, never read),
and its keys without an image in the tar are rows too, so img2dataset's failed downloads show up
in the output.

Each tar is streamed once (tarfile over an fsspec file, a few large reads) into an index,
`OUT/_input/webdataset/<tar stem>-<digest>.parquet`: `id`, `tar`, `offset` and `size` of the
image member's data, `txt`, `json`, then the sidecar's columns. The digest covers the tar's URI,
size and ETag/mtime, its sidecar's, and the image extensions, so an unchanged tar is never
indexed again and a replaced one gets a new index (and new shards: `resume` refuses an output
planned from the old one, `incremental` labels only what changed). From there the plan is the
ordinary Parquet plan over the index files: a shard is a range of one tar's rows, so resume,
retry_failed and incremental need nothing of their own. At read time a shard's image bytes come
from one range read of its tar (the first row's offset to the last row's end), sliced per row.

Members, decided:
- one key, several image members (`a.jpg` and `a.png`): the extension listed first in
  `input.image_extensions` is the row's image, the others are skipped (counted in the log);
- a member path repeated in one tar (appended twice): the last one wins, as `tar -x` leaves it;
- one key in two tars (or twice in a sidecar): the job stops before any model work, naming the
  key and the tars, as for a manifest whose ids repeat (the output is joined on them);
- only regular files count (a symlink or device member is never followed); a `.txt`/`.json`
  member over `_TEXT_LIMIT` bytes is not kept (null, logged): that is no caption;
- a truncated tar keeps the members before the cut; the member the cut falls in keeps the bytes
  that exist (it ends as `decode_error`); a file that is not a tar stops the job, naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import posixpath
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.columns import FETCH_ERROR, SOURCE_FAILED, TOO_LARGE
from pipeline.config import JobConfig, StorageConfig
from pipeline.guards.locations import default_policy
from pipeline.guards.redact import redact
from pipeline.output.layout import exists, table_to_parquet_bytes, write_bytes_atomic
from pipeline.planning import manifest as m
from pipeline.planning.ids import IN_PROCESS_ROWS, check_unique_ids
from pipeline.planning.manifest import ManifestError, ManifestPlan, Shard, shard_id
from pipeline.storage import filesystem, full_uri, is_remote, join, protocol_of

log = logging.getLogger("ziya_batch")

INDEX_DIR = "_input/webdataset"
# Bumped when the index's layout changes, so old indexes are not read as new ones.
INDEX_VERSION = 1
INDEX_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("tar", pa.string()),
        ("offset", pa.int64()),  # where the image member's data starts in the tar
        ("size", pa.int64()),  # its length in bytes
        ("txt", pa.string()),
        ("json", pa.string()),
    ]
)
# The index's own bookkeeping: read by the read stage, never written to the output.
INTERNAL_COLUMNS = ("tar", "offset", "size")
SIDECAR_KEY = "key"
SIDECAR_STATUS = "status"  # img2dataset's download status: the source_status role
_TEXT_LIMIT = 1 << 20
_INDEX_THREADS = 8  # tars indexed at once: streaming them is I/O bound
_TAR_BLOCK = 16 << 20  # bytes per read when streaming a remote tar


@dataclass(frozen=True)
class WebDatasetPlan(ManifestPlan):
    """A ManifestPlan over the index files; the index's tar/offset/size never reach the output."""

    @property
    def passthrough_columns(self) -> list[str]:
        return [c for c in super().passthrough_columns if c not in INTERNAL_COLUMNS]


@dataclass(frozen=True)
class TarSource:
    uri: str  # full URI of the tar
    size: int
    version: str  # ETag, or size:mtime
    sidecar: str | None = None  # full URI of {stem}.parquet beside it, when there is one
    sidecar_version: str = ""


@dataclass
class _Members:
    """What streaming one tar found, before the sidecar join."""

    images: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # key -> rank, off, size
    order: dict[str, int] = field(default_factory=dict)  # key -> position of its first member
    texts: dict[str, dict[str, str | None]] = field(default_factory=dict)  # ext -> key -> text
    notes: dict[str, list[str]] = field(default_factory=dict)  # what was skipped, and why


def _version(info: dict) -> str:
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if etag:
        return str(etag).strip('"')
    return f"{info.get('size')}:{info.get('mtime') or info.get('LastModified') or ''}"


def list_tars(uri: str | list[str], storage: StorageConfig) -> list[TarSource]:
    """Every tar named by `input.uri`, sorted within each entry, with its sidecar if present."""
    sources: list[TarSource] = []
    for u in [uri] if isinstance(uri, str) else list(uri):
        if protocol_of(u) in ("http", "https"):
            raise ManifestError(f"WebDataset tars must be on s3://, gs:// or local disk, not {u}")
        fs, path = filesystem(u, storage)
        if not fs.exists(path):
            raise ManifestError(f"WebDataset location {u} does not exist")
        if fs.isdir(path):
            found = fs.find(path, detail=True)
            tars = sorted(p for p in found if p.endswith(".tar"))
            if not tars:
                raise ManifestError(f"WebDataset location {u} holds no .tar files")
            for p in tars:
                side = p[: -len(".tar")] + ".parquet"
                sources.append(_source(fs, p, found[p], side, found.get(side)))
        else:
            side = path[: -len(".tar")] + ".parquet" if path.endswith(".tar") else None
            side_info = None
            if side is not None:
                try:
                    side_info = fs.info(side)
                except FileNotFoundError:
                    side_info = None
            sources.append(_source(fs, path, fs.info(path), side, side_info))
    uris = [s.uri for s in sources]
    if len(set(uris)) != len(uris):
        raise ManifestError("the same tar is listed twice: " + ", ".join(uris))
    return sources


def _source(fs: Any, path: str, info: dict, side: str | None, side_info: dict | None) -> TarSource:
    has_side = side is not None and side_info is not None and side_info.get("type") != "directory"
    return TarSource(
        uri=full_uri(fs, path),
        size=int(info.get("size") or 0),
        version=_version(info),
        sidecar=full_uri(fs, side) if has_side and side else None,
        sidecar_version=f"{side_info.get('size')}:{_version(side_info)}" if has_side else "",
    )


def _sources(job: JobConfig) -> list[str]:
    """input.uri's entries as the default allowed locations: a directory as itself (`dir/`)."""
    out = []
    uris = job.input.uri
    for u in [uris] if isinstance(uris, str) else list(uris or []):
        fs, path = filesystem(u, job.storage)
        out.append(u.rstrip("/") + "/" if fs.isdir(path) else u)
    return out


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a member path, as WebDataset splits it: at the first dot of the file
    name (`a/000.seg.png` -> `a/000`, `seg.png`)."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext if dot else ""


def index_name(src: TarSource, extensions: tuple[str, ...]) -> str:
    """`<tar stem>-<digest>.parquet`: what the index depends on, and nothing else."""
    stem = posixpath.basename(src.uri)[: -len(".tar")] or "tar"
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:40]
    key = [INDEX_VERSION, src.uri, src.size, src.version, src.sidecar, src.sidecar_version]
    digest = hashlib.sha1(json.dumps([*key, list(extensions)]).encode()).hexdigest()[:12]
    return f"{stem}-{digest}.parquet"


def scan_tar(fileobj: Any, size: int, extensions: tuple[str, ...], where: str) -> _Members:
    """Stream one tar: the image member of every key (offset, size), its `.txt`/`.json` text."""
    found = _Members()
    rank = {e: i for i, e in enumerate(extensions)}
    seen_paths: set[str] = set()

    def note(kind: str, text: str) -> None:
        found.notes.setdefault(kind, []).append(text)

    try:
        # "r|": a stream, read front to back once; the image data is skipped, not kept.
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    note("not a regular file", member.name)
                    continue
                key, ext = split_member(member.name)
                ext = ext.lower()
                if member.name in seen_paths:
                    note("repeated member (the last one kept)", member.name)
                seen_paths.add(member.name)
                found.order.setdefault(key, len(found.order))
                if ext in rank:
                    # Data cut by a truncated tar: keep what exists (it will not decode).
                    length = max(0, min(member.size, size - member.offset_data))
                    held = found.images.get(key)
                    if held is not None and held[0] != rank[ext]:
                        note("second image of a key (skipped)", member.name)
                        if held[0] < rank[ext]:
                            continue
                    found.images[key] = (rank[ext], member.offset_data, length)
                elif ext in ("txt", "json"):
                    if member.size > _TEXT_LIMIT:
                        note(f".{ext} member over {_TEXT_LIMIT} bytes (not kept)", member.name)
                        text = None
                    else:
                        reader = tar.extractfile(member)
                        raw = reader.read() if reader is not None else b""
                        text = raw.decode("utf-8", "replace")
                    found.texts.setdefault(ext, {})[key] = text
                else:
                    note("other member", member.name)
    except tarfile.ReadError as err:
        if not found.order:
            raise ManifestError(f"{where} is not a readable tar: {err}") from None
        note("truncated tar", f"{err} after {len(found.order)} keys")
    return found


def _read_sidecar(src: TarSource, storage: StorageConfig) -> pa.Table | None:
    if src.sidecar is None:
        return None
    fs, path = filesystem(src.sidecar, storage)
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except Exception as err:
        raise ManifestError(
            f"sidecar {src.sidecar} is not a readable Parquet file: {err}"
        ) from None
    names = table.column_names
    if SIDECAR_KEY not in names:
        raise ManifestError(f"sidecar {src.sidecar} has no {SIDECAR_KEY!r} column; its: {names}")
    clash = sorted(set(names) & set(INDEX_SCHEMA.names))
    if clash:
        raise ManifestError(
            f"sidecar {src.sidecar}: columns {clash} clash with the index's own columns "
            f"{INDEX_SCHEMA.names}; rename them"
        )
    if SIDECAR_STATUS in names and not pa.types.is_string(table.schema.field(SIDECAR_STATUS).type):
        raise ManifestError(f"sidecar {src.sidecar}: column 'status' must be a string")
    return table.set_column(
        names.index(SIDECAR_KEY), SIDECAR_KEY, table.column(SIDECAR_KEY).cast(pa.string())
    )


def build_index(src: TarSource, extensions: tuple[str, ...], storage: StorageConfig) -> pa.Table:
    """The index rows of one tar: its images in tar order, then the sidecar's keys it lacks."""
    fs, path = filesystem(src.uri, storage)
    opts = {"block_size": _TAR_BLOCK} if is_remote(src.uri) else {}
    with fs.open(path, "rb", **opts) as f:
        found = scan_tar(f, src.size, extensions, src.uri)
    keys = sorted(found.images, key=found.order.__getitem__)
    texts = {ext: found.texts.get(ext, {}) for ext in ("txt", "json")}
    lost_texts = {k for t in texts.values() for k in t} - set(found.images)
    sidecar = _read_sidecar(src, storage)
    if sidecar is not None:
        position = {k: i for i, k in enumerate(sidecar.column(SIDECAR_KEY).to_pylist())}
        taken = [position.get(k) for k in keys]
        used = {i for i in taken if i is not None}
        extra = [i for i in range(sidecar.num_rows) if i not in used]  # no image in the tar
        extra_keys = sidecar.column(SIDECAR_KEY).take(pa.array(extra, pa.int64())).to_pylist()
        lost_texts -= set(extra_keys)
    else:
        taken, extra, extra_keys = [], [], []
    if lost_texts:
        found.notes.setdefault("text without an image", []).extend(sorted(lost_texts))
    ids = keys + extra_keys
    n_extra = len(extra_keys)
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "tar": pa.array([src.uri] * len(ids), pa.string()),
            "offset": pa.array([found.images[k][1] for k in keys] + [None] * n_extra, pa.int64()),
            "size": pa.array([found.images[k][2] for k in keys] + [None] * n_extra, pa.int64()),
            "txt": pa.array([texts["txt"].get(k) for k in ids], pa.string()),
            "json": pa.array([texts["json"].get(k) for k in ids], pa.string()),
        },
        schema=INDEX_SCHEMA,
    )
    if sidecar is not None:
        rows = sidecar.drop_columns([SIDECAR_KEY]).take(pa.array(taken + extra, pa.int64()))
        for name in rows.column_names:
            table = table.append_column(rows.schema.field(name), rows.column(name))
    for kind, items in sorted(found.notes.items()):
        log.warning("%s: %d x %s, e.g. %s", src.uri, len(items), kind, items[0])
    return table


@dataclass(frozen=True)
class _Indexed:
    uri: str
    rows: int
    schema: pa.Schema
    built: bool


def _index_one(job: JobConfig, src: TarSource, extensions: tuple[str, ...]) -> _Indexed:
    storage = job.storage
    uri = join(job.output.uri, INDEX_DIR, index_name(src, extensions))
    built = False
    if not exists(uri, storage):  # named by what it depends on: an existing one is this index
        table = build_index(src, extensions, storage)
        write_bytes_atomic(uri, table_to_parquet_bytes(table), storage)
        built = True
    fs, path = filesystem(uri, storage)
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    return _Indexed(uri, meta.num_rows, meta.schema.to_arrow_schema(), built)


def plan_webdataset(job: JobConfig) -> WebDatasetPlan:
    """Index every tar of `input.uri` (once), and plan shards over the index files."""
    assert job.input.uri is not None, "input.format=webdataset needs input.uri (config validation)"
    t0 = time.time()
    tars = list_tars(job.input.uri, job.storage)
    sources = _sources(job)
    policy = default_policy(job, sources)
    for src in tars:
        reason = policy.check(src.uri)
        if reason:
            raise ManifestError(
                f"WebDataset tar {src.uri} is outside the allowed locations "
                f"({', '.join(policy.allowed)}): {reason}; list it in limits.allowed_locations"
            )
    extensions = tuple(e.lower().lstrip(".") for e in job.input.image_extensions)
    with ThreadPoolExecutor(max(1, min(_INDEX_THREADS, len(tars)))) as pool:
        indexed = list(pool.map(lambda s: _index_one(job, s, extensions), tars))
    schema = indexed[0].schema
    for src, idx in zip(tars, indexed, strict=True):
        if not idx.schema.equals(schema):
            raise ManifestError(
                f"WebDataset tar {src.uri}: its index columns {idx.schema.names} differ from "
                f"{tars[0].uri}'s {schema.names} (a sidecar .parquet missing beside one of them, "
                "or sidecars of other columns); give every tar the same sidecar, or none"
            )
    files = [i.uri for i in indexed]
    shards: list[Shard] = []
    step = job.output.rows_per_shard
    for idx in indexed:
        for start in range(0, idx.rows, step):
            end = min(idx.rows, start + step)
            shards.append(Shard(shard_id(idx.uri, start, end), idx.uri, start, end))
    total = sum(i.rows for i in indexed)
    if not total:
        raise ManifestError(
            f"WebDataset {job.input.uri}: no samples (no member ending in input.image_extensions, "
            "no sidecar rows)"
        )
    log.info(
        "webdataset: %d tars (%d indexed now, %d reused), %d rows in %.1fs",
        len(tars),
        sum(i.built for i in indexed),
        sum(not i.built for i in indexed),
        total,
        time.time() - t0,
    )
    columns = {"id": "id"}
    if SIDECAR_STATUS in schema.names:
        columns[m.SOURCE_STATUS] = SIDECAR_STATUS
    wds_plan = WebDatasetPlan(
        files=files,
        shards=shards,
        total_rows=total,
        schema=schema,
        columns=columns,
        sources=sources,
    )
    if total <= IN_PROCESS_ROWS:
        # As for manifests: small enough to check here, before Ray starts; larger plans are
        # checked by remote tasks at the start of `run`, still before any model work.
        try:
            check_unique_ids(wds_plan, job.storage)
        except ManifestError as err:
            text = str(err)  # named by the tars, not by their index files
            for src, idx in zip(tars, indexed, strict=True):
                text = text.replace(idx.uri, src.uri)
            raise ManifestError(f"WebDataset keys are the row ids: {text}") from None
        wds_plan = dataclasses.replace(wds_plan, ids_checked=True)
    return wds_plan


# -- reading a shard (the read stage) -----------------------------------------------------------

READ_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("id", pa.string()),
        ("image_bytes", pa.binary()),
        ("status", pa.string()),  # null, or why the row has no bytes
        ("error", pa.string()),
    ]
)


def read_rows(shard: Shard, storage: StorageConfig, max_image_bytes: int) -> pa.Table:
    """The shard's rows with their image bytes (READ_SCHEMA): one range read of the tar covers
    every image of the shard. A member over `limits.max_image_bytes` is `too_large` and never
    read (the span is cut around it, and wherever images lie further apart than that limit); a
    row whose source status is not `success`, or without an image member, is `source_failed`; a
    read that fails after `storage.retries` is `fetch_error` for the rows it covered."""
    names = ["id", "tar", "offset", "size"]
    index = m.read_rows(shard, storage, columns=[*names, SIDECAR_STATUS])
    rows = index.to_pylist()
    limit = max_image_bytes
    out = [
        {"row": r["row"], "id": r["id"], "image_bytes": None, "status": None, "error": None}
        for r in rows
    ]
    wanted = []  # positions whose bytes are read, in tar order
    for i, r in enumerate(rows):
        source = r.get(SIDECAR_STATUS)
        if source is not None and source != "success":
            out[i].update(
                status=SOURCE_FAILED,
                error=f"the source has no image for this row (status {source!r})",
            )
        elif r["offset"] is None:
            out[i].update(
                status=SOURCE_FAILED,
                error=f"the tar has no image member for key {r['id']!r}",
            )
        elif r["size"] > limit:
            out[i].update(
                status=TOO_LARGE, error=f"image member is {r['size']} bytes > limit {limit}"
            )
        else:
            wanted.append(i)
    wanted.sort(key=lambda i: rows[i]["offset"])
    for run in _spans(wanted, rows, limit):
        first, last = rows[run[0]], rows[run[-1]]
        start, end = first["offset"], last["offset"] + last["size"]
        data, error = _read_range(first["tar"], start, end, storage)
        for i in run:
            r = rows[i]
            if data is None:
                out[i].update(status=FETCH_ERROR, error=error)
                continue
            lo = r["offset"] - start
            blob = data[lo : lo + r["size"]]
            if len(blob) < r["size"]:
                out[i].update(
                    status=FETCH_ERROR,
                    error=f"{r['tar']} is shorter than its index says (replaced since it was "
                    "indexed?)",
                )
            else:
                out[i]["image_bytes"] = blob
    return pa.Table.from_pylist(out, schema=READ_SCHEMA)


def _spans(wanted: list[int], rows: list[dict], gap: int) -> list[list[int]]:
    """`wanted` (sorted by offset) cut into runs read at once: a new run where the bytes between
    two images exceed `gap` (a too-large member, or much else, lies there)."""
    runs: list[list[int]] = []
    end = None
    for i in wanted:
        r = rows[i]
        if runs and r["tar"] == rows[runs[-1][-1]]["tar"] and r["offset"] - end <= gap:
            runs[-1].append(i)
        else:
            runs.append([i])
        end = r["offset"] + r["size"]
    return runs


def _read_range(uri: str, start: int, end: int, storage: StorageConfig) -> tuple[Any, str | None]:
    """Bytes [start, end) of `uri` in one request, retried like image reads."""
    attempts = storage.retries + 1
    last = ""
    for attempt in range(attempts):
        try:
            fs, path = filesystem(uri, storage)
            return fs.cat_file(path, start=start, end=end), None
        except (FileNotFoundError, PermissionError) as err:
            return None, redact(f"{type(err).__name__} reading {uri}: {err}")
        except Exception as err:  # network, throttling, resets: retry with backoff
            last = redact(f"{type(err).__name__}: {err}")
            if attempt + 1 < attempts:
                time.sleep(min(2.0, 0.1 * 2**attempt))
    return None, f"gave up reading {uri} after {attempts} attempts: {last}"
