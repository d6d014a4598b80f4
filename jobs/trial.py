"""Try a job's task on a few rows of its own manifest, through the pipeline's own stages (no Ray).

    trial = JobTrial.from_text(Path("jobs/caption_dataset.yaml").read_text(), "caption_dataset.yaml")
    sample = trial.sample(n=8, seed=0)                 # manifest.plan: the job's own validation
    rows = trial.run(sample, model, Edits(caption_prompt="Describe the colours."))
    trial.saved_yaml(edits), trial.overrides(edits)    # the job file with the edits, or --set lines

The rows go through `ReadStage` -> `FetchStage` (with the job's location policy, so an image
outside its allowed locations is refused as `invalid_path`, exactly as in the job) ->
`PreprocessStage` -> `InferStage`, called directly on small Arrow tables: what the playground
shows is what `ziya-batch run` writes for those rows. Only the model differs when the job names
another one: every answer here comes from the model (and engine: `InferStage`, or
`VLLMInferStage` for a vLLM playground) the playground was started with.
"""

from __future__ import annotations

import base64
import bisect
import copy
import io
import itertools
import json
import random
import shlex
import threading
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import yaml

from pipeline.columns import OK
from pipeline.config import JobConfig, JobConfigError, parse_job
from pipeline.guards.locations import default_policy
from pipeline.planning.manifest import ManifestPlan, plan
from pipeline.stages.fetch import FetchStage
from pipeline.stages.infer import InferStage
from pipeline.stages.preprocess import PreprocessStage
from pipeline.stages.read import ReadStage
from ziya_model.generation import GenerationSettings
from ziya_model.processing import ImageDecodeError, ImageTooLarge, decode_image

MAX_SAMPLE = 64  # rows per trial: a preview, not a job
MAX_JOB_FILE_BYTES = 1 << 20
THUMBNAIL = 160
SHARD_SCHEMA = pa.schema(
    [("shard_id", pa.string()), ("path", pa.string()), ("start", pa.int64()), ("end", pa.int64())]
)


@dataclass
class LoadedModel:
    """The one model of a playground process; `lock` keeps model calls one at a time.

    With `engine="vllm"`, `model` is the vLLM stage's stand-in (`model.engine` is the
    `ZiyaVLLMEngine`) and trials run through `VLLMInferStage`.
    """

    model: Any
    tokenizer: Any
    processor: Any
    name: str
    visual_dir: str = ""
    llm_dir: str = ""
    engine: str = "transformers"  # or "vllm"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def as_loader(self):
        """What `InferStage` calls to get its model: this one, already loaded."""
        return lambda: (self.model, self.tokenizer, self.processor)


@dataclass(frozen=True)
class Edits:
    """What the playground lets a user change: the prompt and the generation settings."""

    caption_prompt: str | None = None  # caption jobs
    questions: list[str] | None = None  # vqa jobs: task.questions (asked of every row)
    generation: dict[str, Any] = field(default_factory=dict)  # GenerationSettings fields


@dataclass(frozen=True)
class Sample:
    """Rows picked from the manifest: (manifest file URI, row index in that file)."""

    rows: tuple[tuple[str, int], ...]
    total_rows: int
    files: int


class JobTrial:
    """One job file, as written (`data`) and as validated (`job`)."""

    def __init__(self, data: dict[str, Any], source: str):
        self.data = data
        self.source = source
        self.job = parse_job(copy.deepcopy(data), source)
        self._plan: ManifestPlan | None = None

    @classmethod
    def from_text(cls, text: str, source: str) -> JobTrial:
        if len(text.encode("utf-8", "replace")) > MAX_JOB_FILE_BYTES:
            raise JobConfigError(f"job file {source} is larger than {MAX_JOB_FILE_BYTES} bytes")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise JobConfigError(f"cannot read job file {source}: {err}") from None
        if not isinstance(data, dict):
            raise JobConfigError(f"invalid job file {source}: the top level must be a mapping")
        return cls(data, source)

    # -- the edits ------------------------------------------------------------------------------

    def edited_data(self, edits: Edits) -> dict[str, Any]:
        """The job file's mapping with only the edited fields changed (others as written)."""
        data = copy.deepcopy(self.data)
        for key, value in self.changes(edits).items():
            section, name = key.split(".", 1)
            data.setdefault(section, {})[name] = value
        return data

    def changes(self, edits: Edits) -> dict[str, Any]:
        """`section.field` -> new value, for each edit that differs from the job as written."""
        job = self.job
        out: dict[str, Any] = {}
        if edits.caption_prompt is not None and edits.caption_prompt != job.task.caption_prompt:
            out["task.caption_prompt"] = edits.caption_prompt
        if edits.questions is not None and list(edits.questions) != list(job.task.questions):
            out["task.questions"] = list(edits.questions)
        current = job.generation.model_dump()
        for name, value in edits.generation.items():
            if name not in GenerationSettings.model_fields:
                raise JobConfigError(f"unknown generation option {name!r}")
            if value != current[name]:
                out[f"generation.{name}"] = value
        return out

    def edited_job(self, edits: Edits) -> JobConfig:
        """The edited job, validated by the same code as `ziya-batch run` (JobConfigError)."""
        return parse_job(self.edited_data(edits), f"{self.source} (edited)")

    def saved_yaml(self, edits: Edits) -> str:
        """The job file with the edits, validated; comments of the original are not kept."""
        data = self.edited_data(edits)
        self.edited_job(edits)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)

    def overrides(self, edits: Edits) -> list[str]:
        """`--set key=value` arguments (shell-quoted) that turn the original into the edited job.

        Values are JSON, which `apply_overrides` reads as YAML: strings stay strings.
        """
        self.edited_job(edits)
        return [
            "--set " + shlex.quote(f"{key}={json.dumps(value, ensure_ascii=False)}")
            for key, value in self.changes(edits).items()
        ]

    # -- sampling and running -------------------------------------------------------------------

    def manifest_plan(self) -> ManifestPlan:
        """The job's manifest plan (`manifest.plan`: the checks `ziya-batch run` makes first)."""
        if self._plan is None:
            self._plan = plan(self.job)
        return self._plan

    def sample(self, n: int, seed: int) -> Sample:
        """`n` rows of the manifest, chosen with `seed` (the same seed gives the same rows)."""
        if not 1 <= n <= MAX_SAMPLE:
            raise ValueError(f"sample size must be 1..{MAX_SAMPLE}, got {n}")
        p = self.manifest_plan()
        file_rows: dict[str, int] = {}
        for s in p.shards:
            file_rows[s.path] = max(file_rows.get(s.path, 0), s.end)
        starts = list(itertools.accumulate((file_rows.get(f, 0) for f in p.files), initial=0))
        picked = sorted(random.Random(seed).sample(range(p.total_rows), min(n, p.total_rows)))
        rows = []
        for i in picked:  # global row number -> (file, row in that file)
            k = bisect.bisect_right(starts, i) - 1
            rows.append((p.files[k], i - starts[k]))
        return Sample(tuple(rows), p.total_rows, len(p.files))

    def run(self, sample: Sample, model: LoadedModel, edits: Edits | None = None) -> list[dict]:
        """Answer the sampled rows with the (edited) job's task: one dict per (row, question)."""
        job = self.edited_job(edits or Edits())
        p = self.manifest_plan()
        shards = pa.Table.from_pylist(
            [
                {"shard_id": f"trial-{k}", "path": path, "start": row, "end": row + 1}
                for k, (path, row) in enumerate(sample.rows)
            ],
            schema=SHARD_SCHEMA,
        )
        rows = ReadStage.for_job(job)(shards)
        fetched = FetchStage.for_job(job, default_policy(job, p.sources or p.files), "playground")(
            rows
        )
        image_size = model.processor.image_size
        pixels = PreprocessStage(image_size, job.limits.max_image_pixels, job.preprocess.mode)(
            fetched
        )
        stage = InferStage
        if model.engine == "vllm":
            from pipeline.stages.infer_vllm import VLLMInferStage

            stage = VLLMInferStage
        with model.lock:
            answers = stage(model.as_loader(), job.generation, None, job.preprocess.mode)(pixels)
        thumbs = _thumbnails(fetched, job.limits.max_image_pixels)
        images = dict(zip(fetched.column("shard").to_pylist(),
                          fetched.column("image").to_pylist(), strict=True))  # fmt: skip
        out = []
        for r in answers.to_pylist():
            out.append(
                {
                    "id": r["id"],
                    "row": r["row"],
                    "image": images.get(r["shard"]),
                    "question_index": r["question_index"],
                    "question": r["question"],
                    "answer": r["answer"],
                    "status": r["status"],
                    "error": r["error"],
                    "num_tokens": r["num_tokens"],
                    "mean_logprob": r["mean_logprob"],
                    "latency_s": r["latency_s"],
                    "thumbnail": thumbs.get(r["shard"]) if r["status"] == OK else None,
                }
            )
        return out


def _thumbnails(fetched: pa.Table, max_pixels: int) -> dict[str, str]:
    """shard -> small JPEG data URI, decoded with the pipeline's limits (display only)."""
    out = {}
    for shard, data, status in zip(
        fetched.column("shard").to_pylist(),
        fetched.column("image_bytes").to_pylist(),
        fetched.column("status").to_pylist(),
        strict=True,
    ):
        if status != OK or data is None:
            continue
        try:
            image = decode_image(data, max_pixels, draft_size=THUMBNAIL)
        except (ImageTooLarge, ImageDecodeError):
            continue
        out[shard] = thumbnail_uri(image)
    return out


def thumbnail_uri(image, size: int = THUMBNAIL) -> str:
    small = image.copy()
    small.thumbnail((size, size))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
