"""Column contracts between stages, and the row statuses.

Stages never import each other; they agree only on the columns named here. Each stage declares
`INPUT_COLUMNS` (name -> meaning) and checks them on entry, failing loudly with its own name.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa

# Row statuses. A failed row keeps flowing with its status; later stages pass it through.
OK = "ok"
INVALID_PATH = "invalid_path"
FETCH_ERROR = "fetch_error"
TOO_LARGE = "too_large"
DECODE_ERROR = "decode_error"
INVALID_QUESTION = "invalid_question"
INFERENCE_ERROR = "inference_error"
UNCHANGED = "unchanged"  # incremental runs: already labeled identically; never written
# The source never had the image (img2dataset's status was not "success"): nothing to fetch or
# retry, and not a failure of this job (it counts neither toward run.max_failure_rate nor in
# retry_failed mode).
SOURCE_FAILED = "source_failed"
FAILURE_STATUSES = (
    INVALID_PATH,
    FETCH_ERROR,
    TOO_LARGE,
    DECODE_ERROR,
    INVALID_QUESTION,
    INFERENCE_ERROR,
)

# The columns every in-flight row carries (see ARCHITECTURE.md).
ROW_COLUMNS: dict[str, str] = {
    "shard": "shard id the row belongs to",
    "row": "row index inside its manifest file",
    "id": "manifest id",
    "status": "ok or the failure status",
    "error": "why the row failed (null when ok)",
}

STRING_LIST = pa.list_(pa.string())


class StageInputError(ValueError):
    """A batch that does not carry the columns a stage needs: a wiring bug, not bad data."""


def check_columns(stage: str, batch: pa.Table, needed: Mapping[str, str]) -> None:
    missing = [c for c in needed if c not in batch.column_names]
    if missing:
        wanted = "; ".join(f"{c}: {needed[c]}" for c in missing)
        raise StageInputError(
            f"{stage} needs columns {missing} ({wanted}); the batch has {batch.column_names}"
        )


def set_column(
    table: pa.Table, name: str, values: pa.Array | list, type_: pa.DataType | None = None
) -> pa.Table:
    """Replace or append a column."""
    array = (
        values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=type_)
    )
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, array)
    return table.append_column(name, array)


# What the infer stage emits, one row per question: the answer rows that the write stage stages
# and the commit task turns into output rows (both engines emit exactly this).
ANSWER_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("row", pa.int64()),
        ("id", pa.string()),
        ("question_index", pa.int32()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("num_tokens", pa.int32()),
        ("mean_logprob", pa.float32()),  # answer confidence (model-relative), null if no answer
        ("latency_s", pa.float32()),
        ("row_key", pa.string()),
        ("image_identity", pa.string()),
    ]
)


# The committed output, defined once: the commit task writes these columns (after `id` and the
# manifest's pass-through columns), the report reads them, and ARCHITECTURE.md's table is
# checked against this list (tests/test_output_readers.py).
OUTPUT_FIELDS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("task", pa.string(), "caption or vqa"),
    ("question_index", pa.int32(), "index of the question within the row"),
    ("question", pa.string(), "the question asked (the caption prompt for captions)"),
    ("answer", pa.string(), "the model's answer (null when the row failed)"),
    ("status", pa.string(), "ok, or why the row failed (see the statuses above)"),
    ("error", pa.string(), "what went wrong, redacted (null when ok)"),
    ("num_tokens", pa.int32(), "tokens in the answer"),
    ("mean_logprob", pa.float32(), "mean log-probability of the answer's tokens (confidence)"),
    ("latency_s", pa.float32(), "seconds of the model call that answered the row"),
    ("model", pa.string(), "model identity (weights digest, engine)"),
    ("generation", pa.string(), "generation settings, JSON"),
    ("row_key", pa.string(), "what makes an answer reusable in incremental runs"),
    ("image_identity", pa.string(), "the image's version: ETag, size+mtime or content hash"),
    ("manifest_row", pa.int64(), "row index in its manifest file"),
)
OUTPUT_COLUMNS = tuple(name for name, _, _ in OUTPUT_FIELDS)
