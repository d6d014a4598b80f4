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
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pipeline.columns import OUTPUT_COLUMNS
from pipeline.config import JobConfig
from pipeline.guards.locations import LocationPolicy, default_policy
from pipeline.output import layout
from pipeline.output.commit import CommitSettings, CommitTracker
from pipeline.planning.ids import check_unique_ids
from pipeline.planning.manifest import ManifestError, ManifestPlan, Shard, plan
from pipeline.planning.modes import Work, plan_work
from pipeline.runtime.efficiency import EfficiencyBoard
from pipeline.runtime.feeder import Feeders
from pipeline.runtime.metrics import DriverMetrics
from pipeline.runtime.roster import ActorRoster
from pipeline.runtime.weights import ModelLoader, model_identity, read_visual_config
from pipeline.stages.blocks import BlockPlan, BlockStage
from pipeline.stages.fetch import FetchStage
from pipeline.stages.infer import InferStage
from pipeline.stages.preprocess import PreprocessStage
from pipeline.stages.read import ReadStage
from pipeline.stages.write import WriteStage
from pipeline.storage import join

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
    skip_keys: Any = None  # ObjectRef of row keys already labeled (incremental, modes.py)
    loader: Callable[[], Any] | None = None
    roster: ActorRoster | None = None  # set by `run`: where model actors register, to be stopped
    engine_board: Any = None  # EfficiencyBoard: where the model actors add up their figures


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


def build(
    shards: list[Shard],
    ctx: Context,
    isolate: bool = False,
    staging: str | None = None,
    lane: int = 0,
    lanes: int = 1,
) -> Any:
    """The shards to do (in order) -> answer rows, as a lazy Dataset (None: nothing to do).

    The shards' rows are cut into blocks of equal size across shard boundaries, a whole number
    of model batches each (stages/blocks.py); each block is read, fetched and preprocessed in
    one CPU task; the model stage is an actor pool with its own resource request, so
    preprocessing never runs inside a model actor. With `isolate`, each model actor holds one
    batch at a time, none running beside it or queued behind it: a batch that crashes its actor
    then takes no other batch down with it. With `staging` (what `run` does), the model actors
    stage their answers there through the write stage and the Dataset holds its reports instead
    of the answer rows. `lane` of `lanes` (runtime/feeder.py) takes every lanes-th block range
    from the lane-th on, and its share of the model actors.
    """
    import ray

    job, res = ctx.job, ctx.job.resources
    gpu = res.gpus_per_actor > 0
    model_batch = res.batch_size or (DEFAULT_GPU_BATCH if gpu else DEFAULT_CPU_BATCH)
    # Blocks a whole number of model batches: the model gets its first batch as soon as one
    # block is ready, and no model batch is half empty at a shard's end (a model call costs
    # about the same however few rows it holds).
    block_rows = -(-res.preprocess_batch_size // model_batch) * model_batch
    plan = BlockPlan.put(shards, block_rows)
    stage = BlockStage(
        plan,
        ReadStage.for_job(job),
        FetchStage.for_job(job, ctx.policy, ctx.fingerprint, ctx.skip_keys),
        PreprocessStage(ctx.image_size, job.limits.max_image_pixels, job.preprocess.mode),
    )
    # Ranges dealt in turn: the lanes go through the shards side by side, so shards complete
    # (and commit) in order whatever the number of lanes.
    items = plan.items()[lane::lanes]
    if not items:
        return None  # a lane with nothing to do starts no model actors
    actors = res.actors // lanes + (lane < res.actors % lanes)
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        stage,
        batch_size=1,
        batch_format="pyarrow",
        # The memory that decoding an image at the pixel limit needs. It also makes this
        # request differ from the model actors', which is what stops Ray from fusing
        # preprocessing into the actor stage (it fuses maps with equal requests).
        num_cpus=res.preprocess_cpus,
        memory=3 * job.limits.max_image_pixels + 512 * 2**20,
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
                "stage_to": None if staging is None else WriteStage(staging, job.storage),
            },
            batch_size=model_batch,
            batch_format="pyarrow",
            # Two calls per actor at once: InferStage lets only one onto the model and prepares
            # the other beside it (host copies, normalization, output rows), so the model never
            # waits for that work; two more batches queue per actor (Ray's default of 2 tasks
            # per concurrent call), their blocks already fetched.
            compute=ray.data.ActorPoolStrategy(
                size=actors,
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
    scheduling: dict | None = None  # the feeder lanes: how many, their CPU, how busy

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


def _consume(
    make_plan: Callable[[int, int], Any],
    feeders: Feeders,
    tracker: CommitTracker,
    progress: Callable[[Any, int, float], None] | None,
    rows_total: int,
    t0: float,
    max_crashed_batches: int,
) -> None:
    """Stream the lanes' reports into the tracker; a batch that crashed its worker on every
    retry is dropped (up to `run.max_crashed_batches`) and its rows stay missing."""
    try:
        for reports in feeders.feed(make_plan, max_crashed_batches):
            tracker.add(reports)
            if progress:
                progress(tracker.tally, rows_total, time.time() - t0)
    except BaseException:
        # When the job stops early (abort threshold, a failed commit), end the executions now:
        # left running, their tasks keep holding the cluster's CPUs. (The model actors are
        # stopped by `_run_pass` through the roster, see roster.py.)
        feeders.close()
        raise


def _run_pass(
    ctx: Context, make_plan: Callable[[int, int], Any], consume: Callable[[Any], None]
) -> None:
    """One pass over a plan, with a roster of its own: the pass's model actors are stopped when
    it ends, however it ends (see roster.py); left to Ray Data they can outlive the pass and hold
    the GPUs the next one needs. A fresh roster per pass: should one be lost with its node, the
    next pass does not depend on it."""
    ctx.roster = ActorRoster.start()
    try:
        consume(partial(make_plan, ctx))
    finally:
        ctx.roster.close()
        ctx.roster = None


def _isolation_plan(
    work: Work, lost: dict[str, list[int]], ctx: Context, lane: int, lanes: int
) -> Any:
    """The lost rows again, each alone in its block, its model batch and on its actor."""
    job = ctx.job
    one = job.resources.model_copy(update={"batch_size": 1, "preprocess_batch_size": 1})
    alone = dataclasses.replace(ctx, job=job.model_copy(update={"resources": one}))
    by_id = {s.shard_id: s for s in work.todo}
    shards = [
        dataclasses.replace(by_id[sid], rows=tuple(rows)) for sid, rows in sorted(lost.items())
    ]
    return build(shards, alone, isolate=True, staging=work.staging, lane=lane, lanes=lanes)


def _plan(work: Work, ctx: Context, lane: int, lanes: int) -> Any:
    """This invocation's work as one lane's Dataset (what a feeder runs)."""
    return build(work.todo, ctx, staging=work.staging, lane=lane, lanes=lanes)


def _scheduling(feeders: Feeders, wall_s: float) -> dict:
    """The lanes' figures: busy near 1 means the lanes, not the model actors, set the pace
    (set resources.feeders higher, or resources.preprocess_batch_size)."""
    cpu_s = feeders.cpu_s()
    lanes = len(feeders.actors)
    return {"lanes": lanes, "cpu_s": round(cpu_s, 3), "busy": round(cpu_s / wall_s / lanes, 3)}


def run(
    job: JobConfig,
    progress: Callable[[Any, int, float], None] | None = None,
    loader: Callable[[], Any] | None = None,
    context: Context | None = None,
) -> Summary:
    """Run a whole job on the current Ray cluster (call `ray.init` first).

    The driver loop: check the ids (remote tasks, for plans too large to check in `prepare`),
    work out this invocation's work (planning/modes.py), clear staging a killed run left, stream
    the plan's reports into the commit tracker, retry rows whose batches crashed one row per
    batch, commit what is left, write the summary and `_SUCCESS`.

    `progress(tally, rows_total, elapsed_s)` is called after every report batch. `loader`
    replaces the model loader (a picklable callable returning model, tokenizer, processor):
    benchmarks use it for a stand-in model, tests to count model calls. `context` is
    `prepare(job)` when the caller already ran it (to fail fast before starting Ray).
    """

    t0 = time.time()
    ctx = context or prepare(job)
    if loader is not None:
        ctx.loader = loader
    ctx.engine_board = None
    if not ctx.plan.ids_checked:
        check_unique_ids(ctx.plan, job.storage, ray=True)
    work = plan_work(job, ctx.plan, ctx.fingerprint)
    ctx.skip_keys = work.skip_keys
    storage = job.storage
    # Rows staged by a killed run are never read (their shards are redone whole): clear them.
    layout.remove_tree(work.staging, storage)
    success = join(work.out_uri, layout.SUCCESS)
    summary = Summary(
        output=work.out_uri,
        rows_in=0,
        rows_out=0,
        statuses={},
        tokens=0,
        wall_s=0.0,
        shards_total=len(ctx.plan.shards),
        shards_skipped=len(ctx.plan.shards) - len(work.todo),
        shards_committed=0,
        model=ctx.model,
        task=job.task.kind,
        generation=job.generation.model_dump(),
        mode=job.run.mode,
        run_id=work.run_id,
    )
    if not work.todo and layout.exists(success, storage):
        log.info(
            "nothing to do: all %d shards are committed in %s", len(ctx.plan.shards), work.out_uri
        )
        summary.wall_s = time.time() - t0
        return summary
    metrics = DriverMetrics(job.name)
    settings = CommitSettings(
        out_uri=work.out_uri,
        staging=work.staging,
        storage=storage,
        task=job.task.kind,
        model=ctx.model,
        generation=job.generation.as_json(),
        passthrough=tuple(ctx.plan.passthrough_columns),
        mapping=dict(job.input.columns),
        attempt=uuid.uuid4().hex,
    )
    tracker = CommitTracker(
        settings,
        work.todo,
        merge=work.merge,
        max_failure_rate=job.run.max_failure_rate,
        min_rows_before_abort=job.run.min_rows_before_abort,
        metrics=metrics,
        # A committer actor per 8 model actors: commits are I/O, a few per shard of rows.
        committers=-(-job.resources.actors // 8),
    )
    rows_total = sum(s.num_rows for s in work.todo)
    feeders = None
    try:
        if work.todo:
            feeders = Feeders.start(job.resources.lanes)
            ctx.engine_board = EfficiencyBoard.start()  # this invocation's figures only
            consume = partial(
                _consume,
                feeders=feeders,
                tracker=tracker,
                progress=progress,
                rows_total=rows_total,
                t0=t0,
                max_crashed_batches=job.run.max_crashed_batches,
            )
            _run_pass(ctx, partial(_plan, work), consume)
            lost = tracker.missing()
            if lost:
                # Their batches crashed (or hung) the model worker on every retry and Ray Data
                # dropped them. Retry those rows one per batch, so only a row at fault itself fails.
                log.warning(
                    "%d rows were in batches that crashed their worker on every retry; "
                    "retrying them one row per batch",
                    sum(map(len, lost.values())),
                )
                _run_pass(ctx, partial(_isolation_plan, work, lost), consume)
            summary.scheduling = _scheduling(feeders, time.time() - t0)
            feeders.release()  # idle, for this process's next run (feeder.py)
        filled = tracker.finish()
    finally:
        tracker.close()
        if feeders is not None:
            feeders.close()  # the run stopped early: its lanes end with what they run
    layout.remove_tree(work.staging, storage)
    tally = tracker.tally
    summary.rows_in, summary.rows_out = tally.rows_in, tally.rows_out
    summary.statuses, summary.tokens = dict(tally.statuses), tally.tokens
    summary.shards_committed, summary.filled_after_crash = tally.shards, filled
    summary.wall_s = time.time() - t0
    if ctx.engine_board is not None:
        from pipeline.runtime import efficiency

        totals = efficiency.read_totals(ctx.engine_board)
        summary.efficiency = efficiency.summarize(job, totals, summary.tokens, summary.wall_s)
        if job.model.engine == "vllm" and totals is not None:
            from pipeline.stages.infer_vllm import engine_section

            summary.engine = engine_section(totals, summary.wall_s, job.resources.actors)
    # The success marker and summary are written only when every shard is committed.
    final = layout.committed_shards(work.out_uri, storage)
    missing = [sid for sid in work.planned if sid not in final]
    if missing:
        raise RuntimeError(
            f"{len(missing)} shards are not committed, e.g. {missing[0]}; rerun to resume"
        )
    layout.write_json(
        join(work.out_uri, layout.SUMMARY),
        {**summary.as_dict(), "metrics": metrics.values},
        storage,
    )
    layout.write_bytes_atomic(success, b"", storage)
    return summary
