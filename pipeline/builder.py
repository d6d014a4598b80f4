"""The Ray Data plan, and `run(job)`: plan shards, skip committed ones, stream, commit, summarize.

    ds = build(shards_dataset, job, plan)   # Dataset of answer rows; nothing runs until consumed
    summary = run(job)                      # the whole job, as `ziya-batch run` does it

`build` is the composable part: users can feed it their own Dataset of shard descriptors and
consume the answer rows in their own Ray Data code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.columns import FAILURE_STATUSES, OK
from pipeline.config import JobConfig
from pipeline.guards.locations import LocationPolicy
from pipeline.output import layout
from pipeline.output.writer import OUTPUT_COLUMNS, ShardCommitter
from pipeline.planning.manifest import ManifestError, ManifestPlan, Shard, plan
from pipeline.runtime.metrics import DriverMetrics
from pipeline.runtime.roster import ActorRoster
from pipeline.runtime.weights import ModelLoader, model_identity, read_visual_config
from pipeline.stages.fetch import FetchStage, key_as_int
from pipeline.stages.infer import InferStage
from pipeline.stages.preprocess import PreprocessStage
from pipeline.stages.read import ReadStage
from pipeline.storage import filesystem, is_remote, join, protocol_of

log = logging.getLogger("ziya_batch")


@dataclass
class Context:
    """What the driver works out once before building the plan."""

    job: JobConfig
    plan: ManifestPlan
    model: str  # model identity written to every row
    image_size: int
    fingerprint: str  # task + prompt + model + generation: what makes an answer reusable
    policy: LocationPolicy
    done_keys: np.ndarray | None = None  # incremental: keys of rows already labeled
    loader: Callable[[], Any] | None = None
    roster: ActorRoster | None = None  # set by `run`: where model actors register, to be stopped
    engine_board: Any = None  # EfficiencyBoard: where the model actors add up their figures


def default_policy(job: JobConfig, manifest_files: list[str]) -> LocationPolicy:
    """The job's allowed locations; by default the buckets / directories of the manifests (a
    location ending in `/` is a directory itself: input.images)."""
    allowed = list(job.limits.allowed_locations)
    if not allowed:
        for uri in manifest_files:
            if is_remote(uri):
                proto = protocol_of(uri)
                bucket = filesystem(uri, job.storage)[1].split("/", 1)[0]
                allowed.append(f"{proto}://{bucket}/")
            else:
                fs, path = filesystem(uri, job.storage)
                folder = path if uri.endswith("/") else fs._parent(path)
                allowed.append(folder.rstrip("/") + "/")
    allow_local = any(
        not is_remote(a) and not a.startswith(("http://", "https://")) for a in allowed
    )
    return LocationPolicy(
        allowed=sorted(set(allowed)),
        allow_local=allow_local,
        allow_http=job.limits.allow_http,
        allowed_networks=job.limits.allowed_networks,
    )


def prepare(job: JobConfig) -> Context:
    """Validate everything that can be validated before any model work."""
    manifest_plan = plan(job)
    clash = sorted(set(manifest_plan.passthrough_columns) & set(OUTPUT_COLUMNS))
    if clash:
        hint = (
            " (img2dataset's status column: map it with input.columns.source_status)"
            if "status" in clash
            else ""
        )
        raise ManifestError(
            f"manifest columns {clash} clash with output columns the pipeline adds; rename them"
            + hint
        )
    identity = model_identity(job)
    visual_cfg = read_visual_config(job)
    image_size = int((visual_cfg.get("vision_config") or {}).get("image_size", 224))
    prompt = job.task.caption_prompt if job.task.kind == "caption" else ""
    key = [job.task.kind, prompt, identity, job.generation.as_json(), job.preprocess.mode]
    if job.model.engine != "transformers":
        # Another engine's answers are not reusable as the reference engine's (bf16 numerics
        # differ); the transformers engine keeps the keys it always had.
        identity = f"{identity}+{job.model.engine}"
        key.append(job.model.engine)
    fingerprint = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    return Context(
        job=job,
        plan=manifest_plan,
        model=identity,
        image_size=image_size,
        fingerprint=fingerprint,
        policy=default_policy(job, manifest_plan.sources or manifest_plan.files),
        loader=ModelLoader(job),
    )


# Images per model batch when resources.batch_size is empty. On GPU, decode is compute-bound
# only with hundreds of sequences (see the roofline in ziya-visual.md); InferStage still caps
# each generate call at what the KV cache fits in free memory.
DEFAULT_GPU_BATCH = 256
DEFAULT_CPU_BATCH = 8


def build(shards: Any, ctx: Context, isolate: bool = False) -> Any:
    """Shard descriptors (Dataset with shard_id, path, start, end, rows) -> answer rows.

    Read runs one CPU task per shard; its rows are re-cut into blocks of equal size across shard
    boundaries; fetch and preprocess run fused as CPU tasks on those blocks; the model stage is an
    actor pool with its own resource request, so preprocessing never runs inside a model actor.
    With `isolate`, each model actor holds one batch at a time, none running beside it or queued
    behind it: a batch that crashes its actor then takes no other batch down with it.
    """
    import ray

    job, res = ctx.job, ctx.job.resources
    gpu = res.gpus_per_actor > 0
    model_batch = res.batch_size or (DEFAULT_GPU_BATCH if gpu else DEFAULT_CPU_BATCH)
    # The CPU stages reserve the memory that decoding an image at the pixel limit needs. That
    # also makes their resource request differ from the model actors', which is what stops Ray
    # from fusing preprocessing into the actor stage (it fuses maps with equal requests).
    cpu = {
        "num_cpus": res.preprocess_cpus,
        "memory": 3 * job.limits.max_image_pixels + 512 * 2**20,
        "batch_format": "pyarrow",
    }
    # Read has a request of its own, so it is not fused with fetch + preprocess: fused, Ray
    # would bundle as many shards per task as the largest batch size of the chain (32 shards),
    # and one task would preprocess the whole job on one core.
    ds = shards.map_batches(ReadStage(job), batch_size=1, batch_format="pyarrow")
    # Blocks of equal size across shard boundaries (strict: only the very last block is short),
    # a whole number of model batches each. Fetch + preprocess then run as tasks of one block
    # that spread over every core, the model gets its first batch as soon as one block is
    # ready, and no model batch is half empty at every shard's end (a model call costs about
    # the same however few rows it holds).
    block_rows = -(-res.preprocess_batch_size // model_batch) * model_batch
    ds = ds.repartition(target_num_rows_per_block=block_rows, strict=True)
    ds = ds.map_batches(
        FetchStage(job, ctx.policy, ctx.fingerprint, ctx.done_keys),
        batch_size=block_rows,
        **cpu,
    )
    ds = ds.map_batches(
        PreprocessStage(ctx.image_size, job.limits.max_image_pixels, job.preprocess.mode),
        batch_size=res.preprocess_batch_size,
        **cpu,
    )
    # Ray Data restarts a dead model actor and retries its tasks (max_restarts=-1 by default):
    # rows are at-least-once here, and the writer turns that into exactly-once output. Task
    # retries are bounded (Ray Data's default is unbounded): a row that kills its worker every
    # time would otherwise be retried forever; `run` retries the rows of such a batch alone.
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for max_task_retries; its generic ray_remote_args
        # path warns that it goes away in Ray 2.64.
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        infer_stage, loader, in_flight = InferStage, ctx.loader, 2
        if ctx.engine_board is None:
            from pipeline.runtime.efficiency import EfficiencyBoard

            ctx.engine_board = EfficiencyBoard.start()  # the summary's efficiency figures
        if job.model.engine == "vllm":
            # The same stage with vLLM in place of the transformers model (infer_vllm.py);
            # several batches per actor at once keep the engine's running batch full.
            from pipeline.stages.infer_vllm import VLLMInferStage, VLLMLoader

            infer_stage, in_flight = VLLMInferStage, job.model.vllm.batches_in_flight
            loader = VLLMLoader(job)
        return ds.map_batches(
            infer_stage,
            fn_constructor_args=(
                loader,
                _generation(job),
                res.batch_size,
                job.preprocess.mode,
                ctx.roster,
            ),
            # A model call past this ends its actor: retried like a crash (see watchdog.py).
            fn_constructor_kwargs={
                "batch_timeout_s": job.run.batch_timeout_s,
                "board": ctx.engine_board,
            },
            batch_size=model_batch,
            batch_format="pyarrow",
            # Two calls per actor at once: InferStage lets only one onto the model and prepares
            # the other beside it (host copies, normalization, output rows), so the model never
            # waits for that work; two more batches queue per actor (Ray's default of 2 tasks
            # per concurrent call), their blocks already fetched.
            compute=ray.data.ActorPoolStrategy(
                size=res.actors,
                max_concurrent_calls_per_actor=1 if isolate else in_flight,
                max_tasks_in_flight_per_actor=1 if isolate else None,
                enable_true_multi_threading=True,
            ),
            num_gpus=res.gpus_per_actor,
            num_cpus=res.cpus_per_actor,
            max_task_retries=job.run.max_task_retries,
        )


def _generation(job: JobConfig):
    return job.generation  # already ziya_model's GenerationSettings


@dataclass
class Summary:
    output: str
    rows_in: int
    rows_out: int
    statuses: dict[str, int]
    tokens: int
    wall_s: float
    shards_total: int
    shards_skipped: int
    shards_committed: int
    model: str
    task: str
    generation: dict
    mode: str
    run_id: str | None = None
    filled_after_crash: list[str] = field(default_factory=list)
    engine: dict | None = None  # model.engine=vllm: prefix-cache hit rate, busy fraction, ...
    efficiency: dict | None = None  # both engines: tokens/s, busy, roofline (efficiency.py)

    @property
    def images_per_s(self) -> float:
        return self.rows_in / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(images_per_s=round(self.images_per_s, 3), tokens_per_s=round(self.tokens_per_s, 3))
        d["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return d


def _run_dir(ctx: Context) -> tuple[str, str | None]:
    """Where this run writes: OUT itself, or OUT/runs/<run_id> for incremental runs.

    An incremental run id is derived from the manifests' listing and the job fingerprint, so a
    crashed scheduled run resumes into the same directory, while tomorrow's run gets a new one.
    """
    job = ctx.job
    if job.run.mode != "incremental":
        return job.output.uri, None
    listing = []
    for uri in ctx.plan.files:
        fs, path = filesystem(uri, job.storage)
        info = fs.info(path)
        listing.append([uri, info.get("size"), str(info.get("ETag") or info.get("mtime"))])
    run_id = hashlib.sha256(json.dumps([listing, ctx.fingerprint]).encode()).hexdigest()[:12]
    return join(job.output.uri, layout.RUNS_DIR, run_id), run_id


def _done_keys(ctx: Context, run_id: str) -> np.ndarray:
    """Row keys of every `ok` row committed by earlier incremental runs, sorted, as uint64."""
    keys: list[int] = []
    for run in layout.list_runs(ctx.job.output.uri, ctx.job.storage):
        if run == run_id:
            continue
        run_uri = join(ctx.job.output.uri, layout.RUNS_DIR, run)
        for sid in layout.committed_shards(run_uri, ctx.job.storage):
            t = layout.read_shard(run_uri, sid, ctx.job.storage, columns=["row_key", "status"])
            t = t.filter(pc.equal(t.column("status"), OK))
            keys.extend(key_as_int(k) for k in t.column("row_key").to_pylist() if k)
    return np.unique(np.array(keys, dtype=np.uint64))


def _retry_plan(
    ctx: Context, out_uri: str, committed: set[str]
) -> tuple[list[Shard], dict[str, pa.Table]]:
    """retry_failed: partial shards holding only the failed rows of committed shards."""
    shards, replace = [], {}
    by_id = {s.shard_id: s for s in ctx.plan.shards}
    for sid in sorted(committed & set(by_id)):
        table = layout.read_shard(out_uri, sid, ctx.job.storage)
        failed = table.filter(pc.is_in(table.column("status"), pa.array(FAILURE_STATUSES)))
        rows = sorted(set(failed.column("manifest_row").to_pylist()))
        if rows:
            s = by_id[sid]
            shards.append(Shard(s.shard_id, s.path, s.start, s.end, tuple(rows)))
            replace[sid] = table
    return shards, replace


def _consume(
    ds: Any,
    committer: ShardCommitter,
    progress: Callable[[Any, int, float], None] | None,
    rows_total: int,
    t0: float,
) -> None:
    """Stream the answer rows into the committer; a batch that crashed its worker on every
    retry is dropped (up to `run.max_crashed_batches`) and its rows stay missing."""
    ds.context.max_errored_blocks = committer.job.run.max_crashed_batches
    batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    try:
        for batch in batches:
            committer.add(batch)
            if progress:
                progress(committer.tally, rows_total, time.time() - t0)
    finally:
        # When the job stops early (abort threshold, a failed commit), shut the execution down
        # now: left to the garbage collector, its tasks keep holding the cluster's CPUs. (Its
        # model actors are stopped by `run` through the roster, see roster.py.)
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _run_pass(
    ctx: Context,
    make_plan: Callable[[], Any],
    committer: ShardCommitter,
    progress: Callable[[Any, int, float], None] | None,
    rows_total: int,
    t0: float,
) -> None:
    """One pass over a plan, with a roster of its own: the pass's model actors are stopped when
    it ends, however it ends (see roster.py); left to Ray Data they can outlive the pass and hold
    the GPUs the next one needs. A fresh roster per pass: should one be lost with its node, the
    next pass does not depend on it."""
    ctx.roster = ActorRoster.start()
    try:
        _consume(make_plan(), committer, progress, rows_total, t0)
    finally:
        ctx.roster.close()
        ctx.roster = None


def _isolation_plan(ctx: Context, lost: dict[str, list[int]]) -> Any:
    """The lost rows again, each alone in its block, its model batch and on its actor."""
    import ray

    job = ctx.job
    one = job.resources.model_copy(update={"batch_size": 1, "preprocess_batch_size": 1})
    alone = dataclasses.replace(ctx, job=job.model_copy(update={"resources": one}))
    by_id = {s.shard_id: s for s in ctx.plan.shards}
    items = [
        {"shard_id": sid, "path": s.path, "start": s.start, "end": s.end, "rows": [r]}
        for sid, rows in sorted(lost.items())
        for s in [by_id[sid]]
        for r in rows
    ]
    return build(ray.data.from_items(items, override_num_blocks=len(items)), alone, isolate=True)


def run(
    job: JobConfig,
    progress: Callable[[Any, int, float], None] | None = None,
    loader: Callable[[], Any] | None = None,
    context: Context | None = None,
) -> Summary:
    """Run a whole job on the current Ray cluster (call `ray.init` first).

    `progress(tally, rows_total, elapsed_s)` is called after every batch. `loader` replaces the
    model loader (a picklable callable returning model, tokenizer, processor): benchmarks use it
    for a stand-in model, tests to count model calls. `context` is `prepare(job)` when the
    caller already ran it (to fail fast before starting Ray).
    """
    import ray

    t0 = time.time()
    ctx = context or prepare(job)
    if loader is not None:
        ctx.loader = loader
    ctx.engine_board = None  # `build` starts a fresh board: this invocation's figures only
    out_uri, run_id = _run_dir(ctx)
    storage = job.storage
    mode = job.run.mode
    committed = layout.committed_shards(out_uri, storage)
    if mode == "overwrite":
        # Old answers are taken out first, so a crash in the middle never leaves old and new
        # shards mixed, nor shards of an earlier plan beside this one's.
        layout.remove(join(out_uri, layout.SUCCESS), storage)
        layout.uncommit(out_uri, sorted(committed), storage)
        committed = set()
    foreign = sorted(committed - {s.shard_id for s in ctx.plan.shards})
    if foreign:
        # Committed shards this plan does not have would sit beside its own, as duplicates.
        raise ManifestError(
            f"{out_uri} holds {len(foreign)} committed shards that this job does not plan, "
            f"e.g. {foreign[0]}: the manifest files or output.rows_per_shard changed since "
            "they were written. Write to a new output.uri, use run.mode=overwrite to replace "
            "the output, or run.mode=incremental for manifests that grow."
        )
    replace: dict[str, pa.Table] = {}
    todo = [s for s in ctx.plan.shards if s.shard_id not in committed]
    if mode == "retry_failed":
        # The failed rows of committed shards, and whole shards a crashed run never committed.
        retry, replace = _retry_plan(ctx, out_uri, committed)
        todo = retry + todo
    if mode == "incremental":
        ctx.done_keys = _done_keys(ctx, run_id)
        if not layout.exists(join(out_uri, "run.json"), storage):
            layout.write_json(
                join(out_uri, "run.json"), {"run_id": run_id, "started_at": time.time()}, storage
            )
    success = join(out_uri, layout.SUCCESS)
    if not todo and layout.exists(success, storage):
        log.info("nothing to do: all %d shards are committed in %s", len(ctx.plan.shards), out_uri)
        return Summary(
            output=out_uri,
            rows_in=0,
            rows_out=0,
            statuses={},
            tokens=0,
            wall_s=time.time() - t0,
            shards_total=len(ctx.plan.shards),
            shards_skipped=len(ctx.plan.shards),
            shards_committed=0,
            model=ctx.model,
            task=job.task.kind,
            generation=job.generation.model_dump(),
            mode=mode,
            run_id=run_id,
        )
    metrics = DriverMetrics(job.name)
    committer = ShardCommitter(
        job,
        out_uri,
        todo,
        ctx.plan.passthrough_columns,
        ctx.model,
        metrics=metrics,
        replace=replace,
    )
    if todo:
        items = [
            {
                "shard_id": s.shard_id,
                "path": s.path,
                "start": s.start,
                "end": s.end,
                "rows": list(s.rows) if s.rows else None,
            }
            for s in todo
        ]
        shards_ds = ray.data.from_items(items, override_num_blocks=min(len(items), 1000))
        rows_total = sum(s.num_rows for s in todo)
        _run_pass(ctx, partial(build, shards_ds, ctx), committer, progress, rows_total, t0)
        lost = committer.missing()
        if lost:
            # Their batches crashed (or hung) the model worker on every retry and Ray Data
            # dropped them. Retry those rows one per batch, so only a row at fault itself fails.
            log.warning(
                "%d rows were in batches that crashed their worker on every retry; "
                "retrying them one row per batch",
                sum(map(len, lost.values())),
            )
            retry = partial(_isolation_plan, ctx, lost)
            _run_pass(ctx, retry, committer, progress, rows_total, t0)
    filled = committer.finish()
    tally = committer.tally
    summary = Summary(
        output=out_uri,
        rows_in=tally.rows_in,
        rows_out=tally.rows_out,
        statuses=dict(tally.statuses),
        tokens=tally.tokens,
        wall_s=time.time() - t0,
        shards_total=len(ctx.plan.shards),
        shards_skipped=len(ctx.plan.shards) - len(todo),
        shards_committed=tally.shards,
        model=ctx.model,
        task=job.task.kind,
        generation=job.generation.model_dump(),
        mode=mode,
        run_id=run_id,
        filled_after_crash=filled,
    )
    if ctx.engine_board is not None:
        from pipeline.runtime import efficiency

        totals = efficiency.read_totals(ctx.engine_board)
        summary.efficiency = efficiency.summarize(job, totals, summary.tokens, summary.wall_s)
        if job.model.engine == "vllm" and totals is not None:
            from pipeline.stages.infer_vllm import engine_section

            summary.engine = engine_section(totals, summary.wall_s, job.resources.actors)
    # The success marker and summary are written only when every shard is committed.
    final = layout.committed_shards(out_uri, storage)
    missing = [s.shard_id for s in ctx.plan.shards if s.shard_id not in final]
    if missing:
        raise RuntimeError(
            f"{len(missing)} shards are not committed, e.g. {missing[0]}; rerun to resume"
        )
    layout.write_json(
        join(out_uri, layout.SUMMARY), {**summary.as_dict(), "metrics": metrics.values}, storage
    )
    layout.write_bytes_atomic(success, b"", storage)
    return summary
