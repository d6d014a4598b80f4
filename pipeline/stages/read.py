"""Stage 1, read: shard descriptors -> manifest rows in their in-flight form.

Input columns:  shard_id, path, start, end (one row per shard, from `manifest.plan`)
Output columns: shard, row, id, image, image_bytes, questions, question_errors,
                history_queries, history_answers, status, error
                (image_bytes filled here for image_bytes manifests and WebDataset tars)

Questions are cleaned here (zero-width and control characters, bad UTF-8, lone surrogates,
length) so that later stages and the Parquet writer only ever see safe text. A row whose every
question is unusable ends as `invalid_question` and is never fetched. A row whose source
status (`input.columns.source_status`, img2dataset's `status`) is not `success` ends as
`source_failed` and is never fetched either.

Manifest columns are read by role (`input.columns` maps a role to the file's own column name).

WebDataset input (`input.format: webdataset`): the shard's file is a tar's index
(`pipeline/planning/webdataset.py`); its rows carry the tar, offset and size of their image
member, and the image bytes are read here (one range read of the tar per shard, sliced per row)
into `image_bytes`, so the fetch stage has nothing to fetch. A member over
`limits.max_image_bytes` is `too_large` without being read; a row whose sidecar status is not
`success`, or without an image member, is `source_failed`; a failed read is `fetch_error`.
`image` is null for these rows.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.columns import INVALID_QUESTION, OK, SOURCE_FAILED, STRING_LIST, check_columns
from pipeline.config import InputConfig, JobConfig, StorageConfig, TaskConfig
from pipeline.guards.text import clean_text
from pipeline.planning import manifest as m
from pipeline.planning import webdataset
from pipeline.planning.manifest import Shard

INPUT_COLUMNS = {
    "shard_id": "output shard id",
    "path": "manifest file URI",
    "start": "first row (inclusive)",
    "end": "last row (exclusive)",
}

OUTPUT_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("row", pa.int64()),
        ("id", pa.string()),
        ("image", pa.string()),
        ("image_bytes", pa.binary()),
        ("questions", STRING_LIST),
        ("question_errors", STRING_LIST),
        ("history_queries", STRING_LIST),
        ("history_answers", STRING_LIST),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)

_READ_COLUMNS = list(m.ROLES)


class ReadStage:
    """Reads each shard's rows from its manifest file (only the needed columns)."""

    def __init__(
        self, task: TaskConfig, input: InputConfig, storage: StorageConfig, max_image_bytes: int
    ):
        self.task = task
        self.input = input
        self.storage = storage
        self.max_image_bytes = max_image_bytes  # webdataset: larger members are never read
        self.max_chars = task.max_question_chars

    @classmethod
    def for_job(cls, job: JobConfig) -> ReadStage:
        return cls(job.task, job.input, job.storage, job.limits.max_image_bytes)

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns("ReadStage", batch, INPUT_COLUMNS)
        tables = [self._read_shard(Shard(**d)) for d in batch.to_pylist()]
        return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()

    def _questions(self, row: dict) -> list[str | None]:
        if self.task.kind == "caption":
            return [self.task.caption_prompt]
        fixed = list(self.task.questions)  # the labeling schema, asked of every row
        if row.get(m.QUESTIONS) is not None:
            return fixed + list(row[m.QUESTIONS])
        if row.get(m.QUESTION) is not None:
            return [*fixed, row[m.QUESTION]]
        return fixed

    def _clean_row(self, row: dict) -> dict:
        questions, errors = [], []
        raw = self._questions(row)
        if not raw:
            raw, errors = [""], ["the row has no question"]
        else:
            for q in raw:
                text, problem = clean_text(q, self.max_chars)
                questions.append(text or "")
                errors.append(problem)
        hq, ha = row.get(m.HISTORY_QUERIES) or [], row.get(m.HISTORY_ANSWERS) or []
        history_problem = None
        if len(hq) != len(ha):
            history_problem = f"history has {len(hq)} queries but {len(ha)} answers"
        hq = [clean_text(q, self.max_chars)[0] or "" for q in hq]
        ha = [clean_text(a, self.max_chars * 4)[0] or "" for a in ha]
        if history_problem:
            errors = [history_problem] * len(raw)
        if len(questions) < len(raw):
            questions = [""] * len(raw)
        failed = all(e is not None for e in errors)
        return {
            "questions": questions,
            "question_errors": errors,
            "history_queries": hq,
            "history_answers": ha,
            "status": INVALID_QUESTION if failed else OK,
            "error": "; ".join(sorted({e for e in errors if e})) if failed else None,
        }

    def _read_shard(self, shard: Shard) -> pa.Table:
        if self.input.format == "webdataset":
            return self._read_tar_shard(shard)
        table = m.read_rows(
            shard, self.storage, columns=_READ_COLUMNS, mapping=dict(self.input.columns)
        )
        rows = []
        for row in table.to_pylist():
            out = {
                "shard": shard.shard_id,
                "row": row["row"],
                "id": row[m.ID],
                "image": row.get(m.IMAGE),
                "image_bytes": row.get(m.IMAGE_BYTES),
            }
            out.update(self._clean_row(row))
            source = row.get(m.SOURCE_STATUS)
            if source is not None and source != "success" and out["status"] == OK:
                out["status"] = SOURCE_FAILED
                out["error"] = f"the source has no image for this row (status {source!r})"
                out["image"] = out["image_bytes"] = None
            rows.append(out)
        return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)

    def _read_tar_shard(self, shard: Shard) -> pa.Table:
        """A WebDataset shard: the index's rows, their image bytes read from the tar."""
        table = webdataset.read_rows(shard, self.storage, self.max_image_bytes)
        rows = []
        for row in table.to_pylist():
            out = {
                "shard": shard.shard_id,
                "row": row["row"],
                "id": row["id"],
                "image": None,
                "image_bytes": row["image_bytes"],
            }
            out.update(self._clean_row({}))
            if row["status"] is not None and out["status"] == OK:
                out["status"], out["error"] = row["status"], row["error"]
            rows.append(out)
        return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
