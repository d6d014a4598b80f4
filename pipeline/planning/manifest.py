"""Manifests: find the Parquet files, check them before any GPU work, cut them into shards.

A manifest row names one image (`image` URI or `image_bytes`) under a unique string `id`, and for
VQA its `question` (string) or `questions` (list of strings), optionally with earlier turns in
`history_queries` / `history_answers`. Every other column passes through to the output.

Those names are roles: `input.columns` maps a role to a column of the user's own name (e.g.
`{id: key, image_bytes: jpg}` for img2dataset's parquet output). `read_rows(..., mapping=...)`
returns the roles under their role names, whatever the file calls them; the writer reads the
pass-through columns, the mapped ones included, under the file's own names.

Shards are deterministic: rows [start, end) of one manifest file, named from the file and the
range, so the same work always lands on the same output key (see ARCHITECTURE.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import JobConfig, StorageConfig
from pipeline.guards.text import repair_utf8
from pipeline.storage import filesystem, full_uri

# Columns the pipeline reads from a manifest; everything else passes through untouched.
ID = "id"
IMAGE = "image"
IMAGE_BYTES = "image_bytes"
QUESTION = "question"
QUESTIONS = "questions"
HISTORY_QUERIES = "history_queries"
HISTORY_ANSWERS = "history_answers"
SOURCE_STATUS = "source_status"  # img2dataset's download status: rows not "success" are skipped
KNOWN_COLUMNS = (ID, IMAGE, IMAGE_BYTES, QUESTION, QUESTIONS, HISTORY_QUERIES, HISTORY_ANSWERS)
ROLES = (*KNOWN_COLUMNS, SOURCE_STATUS)
# Roles whose column never passes through: the raw bytes (large), and the source status (the
# output's own status/error say it: source_failed).
_NOT_PASSED = (IMAGE_BYTES, SOURCE_STATUS)
# Output columns the pipeline owns under these names: a manifest column of the same name must
# be the one it reads for the role, or it would be hidden.
_OWNED = (ID, QUESTION)


class ManifestError(ValueError):
    """A manifest that breaks the column rules; raised before any model work starts."""


@dataclass(frozen=True)
class Shard:
    shard_id: str
    path: str  # full URI of the manifest file
    start: int  # first row (inclusive)
    end: int  # last row (exclusive)
    rows: tuple[int, ...] | None = None  # only these rows of the range (retry_failed mode)

    @property
    def num_rows(self) -> int:
        return len(self.rows) if self.rows is not None else self.end - self.start


@dataclass(frozen=True)
class ManifestPlan:
    files: list[str]
    shards: list[Shard]
    total_rows: int
    schema: pa.Schema  # the (common) manifest schema, the file's own column names
    columns: dict[str, str] | None = None  # role -> the file's column (input.columns resolved)
    # Where the images are, for the default location policy (input.images: its prefix); None:
    # the manifests' own buckets / directories.
    sources: list[str] | None = None
    # Ids checked unique (and not null) already; else `run` checks them with remote tasks.
    ids_checked: bool = False

    @property
    def passthrough_columns(self) -> list[str]:
        """Manifest columns copied to the output under their own names: all but the image bytes,
        the source status, and the columns named `id` / `question` (the output's own `id` and
        `question` hold them; a mapped id such as `key` does pass through)."""
        resolved = self.columns or resolve_columns(self.schema.names, {})
        dropped = {resolved[r] for r in _NOT_PASSED if r in resolved} | set(_OWNED)
        return [n for n in self.schema.names if n not in dropped]


def resolve_columns(names: list[str], mapping: dict[str, str]) -> dict[str, str]:
    """role -> column of the file for each role it has: the mapped column, else the column named
    like the role (unless that column is mapped to another role)."""
    used = set(mapping.values())
    out = {}
    for role in ROLES:
        if role in mapping:
            if mapping[role] in names:
                out[role] = mapping[role]
        elif role in names and role not in used and role != SOURCE_STATUS:
            out[role] = role
    return out


def check_mapping(names: list[str], mapping: dict[str, str], source: str) -> dict[str, str]:
    """The resolved role -> column map; a mapping to a missing column, or a column named like a
    pipeline-owned output column hidden by a mapping, is a `ManifestError`."""
    missing = {role: col for role, col in mapping.items() if col not in names}
    if missing:
        wanted = ", ".join(f"{role} -> {col!r}" for role, col in missing.items())
        raise ManifestError(
            f"manifest {source}: input.columns maps {wanted}, but the file has no such column; "
            f"its columns: {names}"
        )
    for owned in _OWNED:
        if owned in names and owned in mapping and mapping[owned] != owned:
            raise ManifestError(
                f"manifest {source}: input.columns maps {owned} to {mapping[owned]!r}, but the "
                f"file also has a column {owned!r}, which the output's own {owned!r} column would "
                f"hide; rename it, or map {owned} to it; its columns: {names}"
            )
    return resolve_columns(names, mapping)


def _role_schema(schema: pa.Schema, resolved: dict[str, str]) -> pa.Schema:
    """The file's schema seen by role (the pipeline's names); a mapped integer id reads as a
    string."""
    fields = []
    for role, col in resolved.items():
        f = schema.field(col).with_name(role)
        if role == ID and col != ID and pa.types.is_integer(f.type):
            f = f.with_type(pa.string())
        fields.append(f)
    return pa.schema(fields)


def shard_id(path: str, start: int, end: int) -> str:
    stem = posixpath.basename(path).rsplit(".", 1)[0] or "manifest"
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:60]
    digest = hashlib.sha1(path.encode()).hexdigest()[:8]
    return f"{stem}-{digest}-{start:09d}-{end:09d}"


def list_manifest_files(uri: str | list[str], storage: StorageConfig) -> list[str]:
    """Full URIs of the manifest Parquet files, sorted; a directory/prefix is listed recursively."""
    uris = [uri] if isinstance(uri, str) else list(uri)
    files: list[str] = []
    for u in uris:
        fs, path = filesystem(u, storage)
        if not fs.exists(path):
            raise ManifestError(f"manifest {u} does not exist")
        if fs.isdir(path):
            found = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
            if not found:
                raise ManifestError(f"manifest directory {u} holds no .parquet files")
            files.extend(full_uri(fs, p) for p in found)
        else:
            files.append(u)
    if len(set(files)) != len(files):
        raise ManifestError("the same manifest file is listed twice: " + ", ".join(files))
    return files


def example_row(table: pa.Table, index: int = 0) -> str:
    row = {
        k: v
        for k, v in repair_utf8(table.slice(index, 1)).to_pylist()[0].items()
        if k != IMAGE_BYTES
    }
    text = repr(row)
    return text if len(text) <= 300 else text[:300] + "…"


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_string_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_string(t.value_type)


def check_schema(
    schema: pa.Schema, task_kind: str, source: str, fixed_questions: bool = False
) -> None:
    """Column rules that can be checked from the schema alone."""
    names = set(schema.names)

    def fail(column: str, problem: str) -> None:
        raise ManifestError(
            f"manifest {source}: column {column!r} {problem}; columns: {schema.names}"
        )

    if ID not in names:
        fail(ID, "is required (a unique string per row)")
    if not _is_string(schema.field(ID).type):
        fail(ID, f"must be a string, got {schema.field(ID).type}")
    if IMAGE not in names and IMAGE_BYTES not in names:
        fail(f"{IMAGE}/{IMAGE_BYTES}", "is required: one of them must name or hold the image")
    if IMAGE in names and not _is_string(schema.field(IMAGE).type):
        fail(IMAGE, f"must be a string URI, got {schema.field(IMAGE).type}")
    if IMAGE_BYTES in names and not (
        pa.types.is_binary(schema.field(IMAGE_BYTES).type)
        or pa.types.is_large_binary(schema.field(IMAGE_BYTES).type)
    ):
        fail(IMAGE_BYTES, f"must be binary, got {schema.field(IMAGE_BYTES).type}")
    if QUESTION in names and not _is_string(schema.field(QUESTION).type):
        fail(QUESTION, f"must be a string, got {schema.field(QUESTION).type}")
    if SOURCE_STATUS in names and not _is_string(schema.field(SOURCE_STATUS).type):
        fail(SOURCE_STATUS, f"must be a string, got {schema.field(SOURCE_STATUS).type}")
    for col in (QUESTIONS, HISTORY_QUERIES, HISTORY_ANSWERS):
        if col in names and not _is_string_list(schema.field(col).type):
            fail(col, f"must be a list of strings, got {schema.field(col).type}")
    if (HISTORY_QUERIES in names) != (HISTORY_ANSWERS in names):
        fail(HISTORY_QUERIES, "and history_answers must come together")
    if (
        task_kind == "vqa"
        and not fixed_questions
        and QUESTION not in names
        and QUESTIONS not in names
    ):
        fail(f"{QUESTION}/{QUESTIONS}", "is required for task vqa")


def plan(job: JobConfig) -> ManifestPlan:
    """Validate every manifest file and cut it into shards; raises `ManifestError`.

    With `input.images`, the listing of the prefix is the manifest (`pipeline/planning/listing.py`);
    with `input.format: webdataset`, the tars' indexes are (`pipeline/planning/webdataset.py`)."""
    if job.input.images is not None:
        from pipeline.planning.listing import plan_images

        return plan_images(job)
    if job.input.format == "webdataset":
        from pipeline.planning.webdataset import plan_webdataset

        return plan_webdataset(job)
    assert job.input.uri is not None, "input.uri or input.images (config validation)"
    files = list_manifest_files(job.input.uri, job.storage)
    mapping = dict(job.input.columns)
    resolved: dict[str, str] = {}
    schema: pa.Schema | None = None
    shards: list[Shard] = []
    total = 0
    for uri in files:
        fs, path = filesystem(uri, job.storage)
        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                file_schema = meta.schema.to_arrow_schema()
        except Exception as err:
            raise ManifestError(f"manifest {uri} is not a readable Parquet file: {err}") from None
        try:
            resolved = check_mapping(file_schema.names, mapping, uri)
            where = f"{uri} (input.columns {mapping})" if mapping else uri
            check_schema(
                _role_schema(file_schema, resolved), job.task.kind, where, bool(job.task.questions)
            )
        except ManifestError as err:
            with fs.open(path, "rb") as f:
                first = pq.ParquetFile(f).read_row_group(0) if meta.num_row_groups else None
            example = example_row(first) if first is not None and first.num_rows else "(no rows)"
            raise ManifestError(f"{err}; example row: {example}") from None
        if schema is None:
            schema = file_schema
        elif not file_schema.equals(schema):
            raise ManifestError(
                f"manifest {uri}: its columns {file_schema} differ from {files[0]}'s {schema}"
            )
        rows = meta.num_rows
        step = job.output.rows_per_shard
        for start in range(0, rows, step):
            end = min(rows, start + step)
            shards.append(Shard(shard_id(uri, start, end), uri, start, end))
        total += rows
    if schema is None:
        raise ManifestError("no manifest files found")
    manifest_plan = ManifestPlan(
        files=files, shards=shards, total_rows=total, schema=schema, columns=resolved
    )
    from pipeline.planning.ids import IN_PROCESS_ROWS, check_unique_ids

    if total <= IN_PROCESS_ROWS:
        # Small enough to check here, before Ray starts; larger plans are checked by remote
        # tasks at the start of `run` (pipeline/planning/ids.py), still before any model work.
        check_unique_ids(manifest_plan, job.storage)
        manifest_plan = dataclasses.replace(manifest_plan, ids_checked=True)
    return manifest_plan


# The row group read last in this process. A row group is the smallest unit Parquet reads, and
# the read stage reads one block of rows at a time (stages/blocks.py): without this, every block
# of a large row group would read and decode the whole group again. Blocks come in order, so a
# worker reads each group about once. Only groups up to CACHED_GROUP_BYTES are kept.
CACHED_GROUP_BYTES = 256 * 2**20
_last_group: tuple[tuple, pa.Table] | None = None


def _file_version(f, fs, path: str) -> tuple:
    """What tells one version of a file from another: ETag or mtime, and size."""
    info = getattr(f, "details", None) or fs.info(path)
    return (info.get("size"), info.get("ETag") or info.get("etag") or info.get("mtime"))


def _row_group(pf: pq.ParquetFile, key: tuple) -> pa.Table:
    """Row group `key[2]` of `pf` (columns `key[3]`), from the last one read when it is that."""
    global _last_group
    if _last_group is not None and _last_group[0] == key:
        return _last_group[1]
    # Let go of the old group first: a read then peaks at one group, as it did without a cache.
    _last_group = None
    table = pf.read_row_group(key[2], columns=list(key[3]) or None)
    _last_group = (key, table) if table.nbytes <= CACHED_GROUP_BYTES else None
    return table


def read_rows(
    shard: Shard,
    storage: StorageConfig,
    columns: list[str] | None = None,
    mapping: dict[str, str] | None = None,
) -> pa.Table:
    """Rows [start, end) of the shard's manifest file, plus `row` (index within the file).

    With `mapping` (`input.columns`, may be empty), `columns` are roles and come back under the
    role names, read from the columns the mapping resolves them to (a mapped integer id as a
    string); without it, `columns` are the file's own names. Only the row groups that overlap
    the range are read. Invalid UTF-8 in string columns is replaced (U+FFFD), so neither the
    stages nor the output writer fail on a bad string.
    """
    fs, path = filesystem(shard.path, storage)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        groups, offset, first = [], 0, None
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if offset < shard.end and offset + n > shard.start:
                groups.append(i)
                first = offset if first is None else first
            offset += n
        names = pf.schema_arrow.names
        roles: dict[str, str] | None = None
        if mapping is not None:
            resolved = resolve_columns(names, mapping)
            roles = {r: resolved[r] for r in (columns or ROLES) if r in resolved}
            columns = list(dict.fromkeys(roles.values()))
        elif columns is not None:
            columns = [c for c in columns if c in names]
        version = _file_version(f, fs, path)
        parts = [_row_group(pf, (shard.path, version, i, tuple(columns or ()))) for i in groups]
        table = pa.concat_tables(parts) if parts else pf.read_row_groups([], columns=columns)
    if roles is not None:
        table = pa.table({r: table.column(c) for r, c in roles.items()})
        if ID in roles and pa.types.is_integer(table.schema.field(ID).type):
            table = table.set_column(table.column_names.index(ID), ID, table[ID].cast(pa.string()))
    table = table.slice(shard.start - (first or 0), shard.end - shard.start)
    table = table.append_column("row", pa.array(range(shard.start, shard.end), type=pa.int64()))
    if shard.rows is not None:
        table = table.filter(pc.is_in(table.column("row"), pa.array(shard.rows, pa.int64())))
    return repair_utf8(table)
