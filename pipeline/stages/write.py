"""Stage 5, write: answer rows -> staged Parquet files on the output's storage, in the model actor.

Input columns:  the infer stage's answer rows (`columns.ANSWER_SCHEMA`: shard, row, id,
                question_index, question, answer, status, error, num_tokens, mean_logprob,
                latency_s, row_key, image_identity)
Output columns: shard, file (the staged file's URI), rows (list<int64>: the manifest rows in it,
                distinct, ascending), answers and failures (list<int32>: answer rows and failed
                answer rows per manifest row), example (one failed row, for the abort message)
                — one row per shard present in the batch

The infer stage calls this on each batch it answered (`InferStage(stage_to=WriteStage(...))`),
outside its model lock: the answers go to storage from the actor that made them, and only this
small report travels on, to the driver, whose work grows with blocks and shards, not with rows
or text. Each batch's rows of one shard go to
`OUT/_staging/[<run_id>/]<shard>/<uuid>.parquet` (a fresh name per attempt: a retried task never overwrites
what an earlier attempt of it staged, and the commit task deduplicates by (row, question_index)).
Nothing under `_staging/` is ever read as output (see pipeline/output/layout.py).
"""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.columns import ANSWER_SCHEMA, FAILURE_STATUSES, check_columns
from pipeline.config import StorageConfig
from pipeline.output.layout import staging_uri
from pipeline.storage import filesystem, is_remote, join

INPUT_COLUMNS = {name: "answer row column (columns.ANSWER_SCHEMA)" for name in ANSWER_SCHEMA.names}

REPORT_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("file", pa.string()),
        ("rows", pa.list_(pa.int64())),
        ("answers", pa.list_(pa.int32())),
        ("failures", pa.list_(pa.int32())),
        ("example", pa.string()),
    ]
)


class WriteStage:
    """Stages each batch's answer rows, one file per shard in the batch."""

    def __init__(self, staging: str, storage: StorageConfig):
        self.staging = staging  # layout.staging_root of the run
        self.storage = storage

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns("WriteStage", batch, INPUT_COLUMNS)
        reports = []
        shard_col = batch.column("shard")
        for sid in pc.unique(shard_col).to_pylist():
            part = batch.filter(pc.equal(shard_col, sid))
            uri = join(staging_uri(self.staging, sid), uuid.uuid4().hex + ".parquet")
            staged = part.drop_columns(["shard"]).cast(ANSWER_SCHEMA.remove(0))
            # No temp file, no fsync, light compression: a staged file is read only after the
            # call that wrote it has returned its report, and lives only until its shard commits.
            fs, path = filesystem(uri, self.storage)
            sink = pa.BufferOutputStream()
            pq.write_table(staged, sink, compression="lz4")
            if not is_remote(uri):
                fs.makedirs(fs._parent(path), exist_ok=True)
            fs.pipe_file(path, sink.getvalue().to_pybytes())
            rows, inverse = np.unique(part.column("row").to_numpy(), return_inverse=True)
            failed = pc.is_in(part.column("status"), pa.array(FAILURE_STATUSES)).to_numpy(
                zero_copy_only=False
            )
            example = None
            if failed.any():
                r = part.slice(int(np.argmax(failed)), 1).to_pylist()[0]
                example = f"id {r['id']!r}: {r['status']}: {r['error']}"
            reports.append(
                {
                    "shard": sid,
                    "file": uri,
                    "rows": rows,
                    "answers": np.bincount(inverse, minlength=len(rows)),
                    "failures": np.bincount(inverse, weights=failed, minlength=len(rows)),
                    "example": example,
                }
            )
        if not reports:
            return REPORT_SCHEMA.empty_table()
        return pa.table(
            {
                "shard": [r["shard"] for r in reports],
                "file": [r["file"] for r in reports],
                "rows": pa.array([r["rows"] for r in reports], REPORT_SCHEMA.field("rows").type),
                "answers": pa.array(
                    [r["answers"].astype(np.int32) for r in reports], pa.list_(pa.int32())
                ),
                "failures": pa.array(
                    [r["failures"].astype(np.int32) for r in reports], pa.list_(pa.int32())
                ),
                "example": [r["example"] for r in reports],
            },
            schema=REPORT_SCHEMA,
        )
