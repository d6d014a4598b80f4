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
