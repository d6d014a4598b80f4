"""Run modes: from (plan, committed shards, mode) the work to do, the shards to merge into, and
the row keys already done. The one module that knows about `run.mode`.

    work = plan_work(job, plan, fingerprint)   # needs Ray for retry_failed and incremental
    work.todo      # shards (or partial shards: the failed rows of one) to run, in plan order
    work.merge     # shards whose committed rows the new ones replace row by row (retry_failed)
    work.skip_keys # ObjectRef of the sorted uint64 row keys already labeled (incremental)

resume        every planned shard not yet committed
retry_failed  that, plus the failed rows of committed shards (read by remote tasks)
incremental   a new run directory OUT/runs/<run_id>/ per manifest listing; rows whose row key
              (`row_key`) some earlier run labeled `ok` are skipped as `unchanged`
overwrite     everything: the committed shards are taken out first

The done keys of an incremental run are gathered by remote tasks into one object in the object
store; the driver holds only its reference, whatever the number of rows (the fetch stage maps it).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.columns import FAILURE_STATUSES, OK
from pipeline.config import JobConfig, StorageConfig
from pipeline.output import layout
from pipeline.planning.manifest import ManifestError, ManifestPlan, Shard
from pipeline.storage import filesystem, join

# Committed shards read per remote task (retry_failed's failed rows, incremental's done keys).
_SHARDS_PER_TASK = 64


def row_key(fingerprint: str, row_id: str, identity: str, question: str, history: Any) -> str:
    """What makes an answer reusable: the same id, image, question, history and job fingerprint."""
    text = json.dumps([fingerprint, row_id, identity, question, history], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def key_as_int(key: str) -> int:
    return int(key, 16)


@dataclass
class Work:
    out_uri: str  # where this run writes: OUT, or OUT/runs/<run_id>
    run_id: str | None  # incremental runs only
    todo: list[Shard]
    merge: frozenset[str] = frozenset()
    skip_keys: Any = None  # ObjectRef of a sorted uint64 array, or None
    planned: list[str] = field(default_factory=list)  # every shard id of the plan
    staging: str = ""  # where the write stage stages this run's rows (layout.staging_root)


def run_dir(job: JobConfig, plan: ManifestPlan, fingerprint: str) -> tuple[str, str | None]:
    """Where this run writes: OUT itself, or OUT/runs/<run_id> for incremental runs.

    An incremental run id is derived from the manifests' listing and the job fingerprint, so a
    crashed scheduled run resumes into the same directory, while tomorrow's run gets a new one.
    """
    if job.run.mode != "incremental":
        return job.output.uri, None
    listing = []
    for uri in plan.files:
        fs, path = filesystem(uri, job.storage)
        info = fs.info(path)
        listing.append([uri, info.get("size"), str(info.get("ETag") or info.get("mtime"))])
    run_id = hashlib.sha256(json.dumps([listing, fingerprint]).encode()).hexdigest()[:12]
    return join(job.output.uri, layout.RUNS_DIR, run_id), run_id


def plan_work(job: JobConfig, plan: ManifestPlan, fingerprint: str) -> Work:
    """The work of this invocation; raises `ManifestError` for an output this plan cannot own."""
    out_uri, run_id = run_dir(job, plan, fingerprint)
    storage, mode = job.storage, job.run.mode
    committed = layout.committed_shards(out_uri, storage)
    planned = [s.shard_id for s in plan.shards]
    if mode == "overwrite":
        # Old answers are taken out first, so a crash in the middle never leaves old and new
        # shards mixed, nor shards of an earlier plan beside this one's.
        layout.remove(join(out_uri, layout.SUCCESS), storage)
        layout.uncommit(out_uri, sorted(committed), storage)
        committed = set()
    foreign = sorted(committed - set(planned))
    if foreign:
        # Committed shards this plan does not have would sit beside its own, as duplicates.
        raise ManifestError(
            f"{out_uri} holds {len(foreign)} committed shards that this job does not plan, "
            f"e.g. {foreign[0]}: the manifest files or output.rows_per_shard changed since "
            "they were written. Write to a new output.uri, use run.mode=overwrite to replace "
            "the output, or run.mode=incremental for manifests that grow."
        )
    todo = [s for s in plan.shards if s.shard_id not in committed]
    work = Work(
        out_uri, run_id, todo, planned=planned, staging=layout.staging_root(job.output.uri, run_id)
    )
    if mode == "retry_failed":
        # The failed rows of committed shards, and whole shards a crashed run never committed.
        retry = _failed_rows(out_uri, [s for s in plan.shards if s.shard_id in committed], storage)
        work.todo = retry + todo
        work.merge = frozenset(s.shard_id for s in retry)
    if mode == "incremental":
        marker = join(out_uri, layout.RUN_MARKER)
        if not layout.exists(marker, storage):
            layout.write_json(marker, {"run_id": run_id, "started_at": time.time()}, storage)
        work.skip_keys = _done_keys(job.output.uri, run_id, storage)
    return work


def _groups(items: list, size: int = _SHARDS_PER_TASK) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _failed_rows(out_uri: str, shards: list[Shard], storage: StorageConfig) -> list[Shard]:
    """retry_failed: partial shards holding only the failed rows of committed shards."""
    import ray

    if not shards:
        return []
    task = ray.remote(num_cpus=0)(_failed_rows_of)
    refs = [task.remote(out_uri, [s.shard_id for s in g], storage) for g in _groups(shards)]
    failed: dict[str, np.ndarray] = {}
    for found in ray.get(refs):
        failed.update(found)
    return [
        Shard(s.shard_id, s.path, s.start, s.end, tuple(int(r) for r in failed[s.shard_id]))
        for s in shards
        if s.shard_id in failed
    ]


def _failed_rows_of(out_uri: str, shard_ids: list[str], storage: StorageConfig) -> dict:
    """{shard id: its failed manifest rows} for the shards that have any (a remote task)."""
    out = {}
    for sid in shard_ids:
        t = layout.read_shard(out_uri, sid, storage, columns=["manifest_row", "status"])
        failed = t.filter(pc.is_in(t.column("status"), pa.array(FAILURE_STATUSES)))
        if failed.num_rows:
            out[sid] = np.unique(failed.column("manifest_row").to_numpy())
    return out


def _done_keys(output_uri: str, run_id: str | None, storage: StorageConfig) -> Any:
    """ObjectRef of the sorted row keys (uint64) of every `ok` row of earlier incremental runs."""
    import ray

    shards = [s for s in layout.committed(output_uri, storage) if s.run != run_id]
    task = ray.remote(num_cpus=0)(_keys_of)
    parts = [task.remote(g, storage) for g in _groups(shards)]
    return ray.remote(num_cpus=0)(_union).remote(*parts)


def _keys_of(shards: list[layout.CommittedShard], storage: StorageConfig) -> np.ndarray:
    keys = []
    for _, t in layout.iter_tables(shards, storage, columns=["row_key", "status"]):
        t = t.filter(pc.and_(pc.equal(t.column("status"), OK), pc.is_valid(t.column("row_key"))))
        keys.extend(key_as_int(k) for k in t.column("row_key").to_pylist())
    return np.array(keys, dtype=np.uint64)


def _union(*parts: np.ndarray) -> np.ndarray:
    return np.unique(np.concatenate(parts)) if parts else np.array([], dtype=np.uint64)
