"""Typed job configuration: one YAML job file becomes one `JobConfig`.

Every field carries a description (shown in validation errors and in `ziya-batch run --help-job`).
Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ziya_model.generation import GenerationSettings
from ziya_model.roofline import GPU_TYPES

DEFAULT_CAPTION_PROMPT = (
    "请用中文和英文各写一句话描述这张图片。Describe this image in one sentence."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# What the pipeline reads from a manifest row, each under the name of its role (manifest.py);
# `input.columns` maps a role to a column of the user's own name.
ManifestRole = Literal[
    "id",
    "image",
    "image_bytes",
    "question",
    "questions",
    "history_queries",
    "history_answers",
    "source_status",
]


DEFAULT_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class InputConfig(_Strict):
    uri: str | list[str] | None = Field(
        default=None,
        description="Manifest location: one Parquet file, a list of them, or a directory/prefix "
        "(s3://, gs://, or a local path). Files are processed in sorted order. Leave empty "
        "with input.images.",
    )
    format: Literal["parquet", "webdataset"] = Field(
        default="parquet",
        description="What input.uri holds. parquet: manifests. webdataset: WebDataset .tar shards "
        "(a prefix/directory listed recursively, one tar, or a list), e.g. img2dataset's "
        "webdataset output: ids are the member keys ({key}.jpg -> key), image members are matched "
        "by input.image_extensions, {key}.txt and {key}.json pass through as string columns txt "
        "and json, and a sidecar {shard}.parquet beside a tar (img2dataset's) is joined by key: "
        "its columns pass through, rows whose status is not 'success' end as source_failed. Each "
        "tar is indexed once into OUT/_input/webdataset/ (a rerun reuses the index of an "
        "unchanged tar); input.columns and input.glob do not apply.",
    )
    images: str | None = Field(
        default=None,
        description="Images without a manifest: a prefix (s3://bucket/photos/, gs://...) or a "
        "local directory, listed recursively in key order; ids are the keys relative to it. The "
        "listing is written as the run's manifest under OUT/_input/ (resume, retry_failed and "
        "incremental work as with a Parquet manifest). Instead of input.uri.",
    )
    image_extensions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IMAGE_EXTENSIONS),
        min_length=1,
        description="input.images: object names ending in one of these (case-insensitive, "
        "without the dot) are images; other objects are skipped. input.format webdataset: tar "
        "members whose extension (after the key's first dot) is one of these are the images.",
    )
    glob: str | None = Field(
        default=None,
        description="input.images: only keys (relative to the prefix) matching this fnmatch "
        "pattern, e.g. '2024/*' or '*_large.jpg' ('*' also matches '/').",
    )
    columns: dict[ManifestRole, str] = Field(
        default_factory=dict,
        description="The manifest's own column names for what the pipeline reads, role -> "
        "column, e.g. {id: key, image_bytes: jpg} (img2dataset's parquet format) or {id: uid, "
        "image: url}. Roles: id (string or integer, unique), image (URI), image_bytes, "
        "question, questions, history_queries, history_answers, source_status (img2dataset's "
        "`status`: rows not 'success' end as source_failed, never fetched). Mapped columns "
        "pass through to the output under their own names (except image bytes and "
        "source_status); the output's `id` column is the mapped id as a string. Unmapped roles "
        "are read from columns named like the role.",
    )

    @field_validator("columns")
    @classmethod
    def _distinct_columns(cls, v: dict[str, str]) -> dict[str, str]:
        empty = [role for role, col in v.items() if not col]
        if empty:
            raise ValueError(f"input.columns: empty column name for {empty}")
        seen: dict[str, str] = {}
        for role, col in v.items():
            if col in seen:
                raise ValueError(
                    f"input.columns maps both {seen[col]!r} and {role!r} to column {col!r}"
                )
            seen[col] = role
        return v

    @model_validator(mode="after")
    def _one_source(self) -> InputConfig:
        if (self.uri is None) == (self.images is None):
            raise ValueError("set exactly one of input.uri (manifests) and input.images (images)")
        if self.images is not None and self.columns:
            raise ValueError("input.columns applies to manifests, not to input.images")
        if self.format == "webdataset":
            if self.uri is None:
                raise ValueError("input.format=webdataset reads the tars named by input.uri")
            if self.columns:
                raise ValueError(
                    "input.columns applies to Parquet manifests; a WebDataset's ids are its member "
                    "keys and its sidecar's `status` is read as the source status"
                )
            if self.glob is not None:
                raise ValueError("input.glob applies to input.images, not to WebDataset tars")
        elif self.uri is not None and self.glob is not None:
            raise ValueError("input.glob applies to input.images, not to manifests")
        return self


class OutputConfig(_Strict):
    uri: str = Field(description="Output directory or prefix; shards, markers and summary go here.")
    rows_per_shard: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Manifest rows per output shard: the unit of commit and of resume.",
    )


class TaskConfig(_Strict):
    kind: Literal["caption", "vqa"] = Field(
        default="caption",
        description="caption: one prompt for every row; vqa: the row's question/questions.",
    )
    caption_prompt: str = Field(
        default=DEFAULT_CAPTION_PROMPT,
        min_length=1,
        description="The question asked of every image when kind is caption.",
    )
    questions: list[str] = Field(
        default_factory=list,
        description="vqa: questions asked of every row (a labeling schema), before the row's own "
        "question/questions; with these set the manifest needs no question column.",
    )
    max_question_chars: int = Field(
        default=2000, ge=1, description="Longer questions end as status invalid_question."
    )


# GPU memory a 14B replica needs, for the error messages below (bf16 weights ~28 GB, fp8 ~15 GB,
# plus KV cache): one 80 GB or 48 GB GPU holds bf16, two 24 GB GPUs hold it with
# tensor_parallel_size 2, one 24 GB GPU holds fp8 weights (Hopper/Ada).
VLLM_QUANTIZATION = ("fp8",)


class VLLMConfig(_Strict):
    max_model_len: int | None = Field(
        default=None,
        ge=64,
        description="Context length (prompt + answer); empty = the LLM's 2048. Smaller saves "
        "KV-cache memory.",
    )
    max_num_seqs: int = Field(
        default=256, ge=1, description="Sequences the engine decodes together."
    )
    gpu_memory_utilization: float = Field(
        default=0.90, gt=0, le=1, description="Share of each GPU vLLM may use (weights + KV cache)."
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        le=8,
        description="GPUs one replica spans (2 fits the 14B model in bf16 on two 24 GB GPUs); "
        "must equal resources.gpus_per_actor.",
    )
    quantization: Literal["fp8"] | None = Field(
        default=None,
        description="vLLM weight quantization: fp8 (Hopper/Ada GPUs; the 14B model in ~15 GB, "
        "fits one 24 GB GPU). Empty = the dtype's weights.",
    )
    enable_prefix_caching: bool = Field(
        default=True,
        description="Reuse the KV blocks of an image and its prompt prefix across its questions.",
    )
    enforce_eager: bool = Field(
        default=False, description="No CUDA graphs (slower; for debugging and CPU tests)."
    )
    block_size: int | None = Field(
        default=None, ge=1, description="KV block size; empty = vLLM's (CPU needs 32)."
    )
    cpu_kvcache_gib: int = Field(
        default=4, ge=1, description="CPU runs only: KV cache size in GiB."
    )
    batches_in_flight: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Ray Data batches each model actor works on at once; their prompts share "
        "the engine's running batch, so it never drains between batches.",
    )
    multiprocessing: bool | None = Field(
        default=None,
        description="Run vLLM's engine core in its own process (empty = vLLM's default, on).",
    )


class ModelConfig(_Strict):
    visual: str = Field(
        description="Visual checkpoint directory (config.json + model.safetensors or "
        "pytorch_model.bin): local path or s3:// / gs:// prefix (copied once per node)."
    )
    llm: str = Field(
        description="Merged Ziya-LLaMA-13B directory (config.json, weights, tokenizer): local "
        "path or s3:// / gs:// prefix (copied once per node)."
    )
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto", description="Weight dtype; auto = bf16 on GPU, fp32 on CPU."
    )
    cache_dir: str = Field(
        default="/tmp/ziya-batch/models",
        description="Node-local directory where weights from object storage are cached.",
    )
    device_map: Literal["none", "auto"] = Field(
        default="none",
        description="transformers engine: auto shards the language model's layers over the "
        "actor's GPUs with accelerate (resources.gpus_per_actor >= 2, e.g. the 14B model in bf16 "
        "on two 24 GB GPUs; the vision encoder stays on the first); none: the whole model on one "
        "device. The vLLM engine shards with model.vllm.tensor_parallel_size instead.",
    )
    engine: Literal["transformers", "vllm"] = Field(
        default="transformers",
        description="transformers: the numerical reference, static batches (CPU default); vllm: "
        "vLLM's engine (continuous batching, paged KV cache, prefix caching), what GPU "
        "clusters run. Needs the vllm extra (pip install 'ziya-batch[vllm]').",
    )
    vllm: VLLMConfig = Field(
        default_factory=lambda: VLLMConfig(),
        description="Settings of the vLLM engine (engine: vllm only).",
    )


# Model actors per feeder lane when resources.feeders is empty: at 120 images/s per GPU that
# is ~4,000 rows/s per lane, well inside what one lane schedules even at the default blocks.
ACTORS_PER_FEEDER = 32


class ResourcesConfig(_Strict):
    actors: int = Field(default=1, ge=1, description="Model replicas (one actor each).")
    gpus_per_actor: float = Field(
        default=0, ge=0, description="GPUs per model actor; 0 runs the model on CPU."
    )
    cpus_per_actor: float = Field(
        default=1,
        ge=0,
        description="CPUs reserved per model actor; 0 lets GPU actors (or benchmark stand-ins) "
        "leave every CPU to preprocessing.",
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Images per model batch; empty = chosen from device memory (GPU) or 8 (CPU).",
    )
    preprocess_cpus: float = Field(
        default=1, gt=0, description="CPUs per fetch/preprocess task (keeps them off model actors)."
    )
    preprocess_batch_size: int = Field(
        default=128,
        ge=1,
        description="Rows per fetch/preprocess task (rounded up to whole model batches); large "
        "enough that Ray's per-task cost stays small next to decoding the images.",
    )
    fetch_threads: int = Field(
        default=16, ge=1, description="Concurrent image reads per fetch task."
    )
    feeders: int | None = Field(
        default=None,
        ge=1,
        description="Lanes that schedule the work: zero-CPU processes on the driver's node, each "
        "running Ray Data's executor for its share of the blocks and model actors (at most one "
        "lane per actor). One lane schedules tens of thousands of rows/s at 1,024-row blocks, a "
        "quarter of that at the default blocks (BENCHMARKS.md section 8); empty = one lane per "
        f"{ACTORS_PER_FEEDER} model actors.",
    )
    gpu_type: Literal[GPU_TYPES] | None = Field(  # type: ignore[valid-type]
        default=None,
        description="The GPU model the actors run on, for the decode-roofline fraction in the "
        "run summary (ziya_model/roofline.py holds the bandwidth/FLOP table): "
        + ", ".join(GPU_TYPES)
        + ". Empty = no roofline figure.",
    )

    @model_validator(mode="after")
    def _lanes_have_actors(self):
        if self.feeders is not None and self.feeders > self.actors:
            raise ValueError(
                f"resources.feeders={self.feeders} is more than resources.actors={self.actors}: "
                "each lane needs a model actor of its own"
            )
        return self

    @property
    def lanes(self) -> int:
        """Feeder lanes this job runs (resources.feeders, or one per ACTORS_PER_FEEDER)."""
        return self.feeders or -(-self.actors // ACTORS_PER_FEEDER)


class StorageConfig(_Strict):
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, moto, ...); empty = AWS default."
    )
    region: str | None = Field(default=None, description="S3 region; empty = default chain.")
    anon: bool = Field(default=False, description="Anonymous (unsigned) access to public buckets.")
    retries: int = Field(default=5, ge=0, le=20, description="Bounded retries per image read.")
    timeout_s: float = Field(default=30.0, gt=0, description="Per-request timeout for image reads.")


class LimitsConfig(_Strict):
    allowed_locations: list[str] = Field(
        default_factory=list,
        description="URI prefixes images may come from (s3://bucket/prefix/, /local/dir/). Empty "
        "= the manifest's own bucket or directory only.",
    )
    allow_http: bool = Field(
        default=False,
        description="Allow http(s):// image URLs (never to loopback, link-local or private hosts).",
    )
    allowed_networks: list[str] = Field(
        default_factory=list,
        description="Networks trusted on purpose for http(s) images, as CIDR (an on-prem image "
        "server at 10.20.0.0/16): their addresses pass the private-address check. Empty = none.",
    )
    max_image_bytes: int = Field(
        default=50 * 1024 * 1024, ge=1, description="Larger image objects end as too_large."
    )
    max_image_pixels: int = Field(
        default=64_000_000,
        ge=1,
        description="Images with more pixels (from the header) are too_large.",
    )

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not a network (e.g. 10.20.0.0/16)") from None
        return v


class PreprocessConfig(_Strict):
    mode: Literal["fast", "exact"] = Field(
        default="fast",
        description="fast: JPEG decoded at reduced DCT scale, uint8 shipped, normalized on the model's device; "
        "exact: transformers' BlipImageProcessor arithmetic, float32 shipped.",
    )


class RunConfig(_Strict):
    mode: Literal["resume", "retry_failed", "incremental", "overwrite"] = Field(
        default="resume",
        description="resume: skip committed shards; retry_failed: redo only failed rows of "
        "committed shards; incremental: label only rows whose (id, image, question, model, "
        "generation) are new; overwrite: redo everything.",
    )
    max_failure_rate: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Abort when the failure fraction exceeds this after min_rows_before_abort.",
    )
    min_rows_before_abort: int = Field(
        default=200, ge=1, description="Rows seen before the failure-rate threshold applies."
    )
    max_task_retries: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Times a model batch is retried when its actor dies (crash, OOM kill, lost "
        "node) before the batch counts as crashed; bounded so a row that kills its worker every "
        "time cannot hang the job.",
    )
    max_crashed_batches: int = Field(
        default=20,
        ge=-1,
        description="Crashed batches tolerated per pass before the job fails (-1 = no limit). "
        "Their rows are retried one per batch; a row that still crashes ends as inference_error.",
    )
    batch_timeout_s: float = Field(
        default=900,
        gt=0,
        description="Longest one model call (encoding a batch's images, or one generate call) "
        "may run. A call past it is taken as hung (a stuck kernel or collective): its actor is "
        "ended and the batch retried like a crash, so a row that hangs every time ends as "
        "inference_error instead of stalling the job. Generous by default: a full GPU batch "
        "takes seconds to a few minutes; raise it for a real model on CPU.",
    )


class JobConfig(_Strict):
    name: str = Field(
        default="ziya-batch", description="Job name (used in logs and submission ids)."
    )
    input: InputConfig
    output: OutputConfig
    model: ModelConfig
    task: TaskConfig = Field(default_factory=TaskConfig)
    # One definition for chat(), answer_batch and job files (ziya_model.generation).
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _engine(self) -> JobConfig:
        """vLLM options that cannot work together with the rest of the job, refused up front."""
        m, res = self.model, self.resources
        if m.device_map == "auto" and (m.engine != "transformers" or res.gpus_per_actor < 1):
            raise ValueError(
                "model.device_map=auto shards the transformers engine over the actor's GPUs: it "
                "needs model.engine=transformers and resources.gpus_per_actor >= 1 (vLLM: use "
                "model.vllm.tensor_parallel_size)"
            )
        if m.engine == "transformers" and res.gpus_per_actor > 1 and m.device_map != "auto":
            raise ValueError(
                f"resources.gpus_per_actor={res.gpus_per_actor} with the transformers engine "
                "needs model.device_map=auto (the model sharded over those GPUs); with "
                "device_map=none one replica uses one GPU and the others would sit idle"
            )
        if res.gpus_per_actor > 1 and res.gpus_per_actor != int(res.gpus_per_actor):
            raise ValueError("resources.gpus_per_actor above 1 must be a whole number of GPUs")
        if res.gpu_type and res.gpus_per_actor == 0:
            raise ValueError(
                f"resources.gpu_type={res.gpu_type} names the actors' GPUs, but "
                "resources.gpus_per_actor is 0 (the model runs on CPU)"
            )
        if m.engine != "vllm":
            return self
        if self.generation.num_beams > 1:
            raise ValueError(
                "model.engine=vllm has no beam search: set generation.num_beams=1 or use "
                "model.engine=transformers"
            )
        tp = m.vllm.tensor_parallel_size
        if tp > 1 and res.gpus_per_actor != tp:
            raise ValueError(
                f"model.vllm.tensor_parallel_size={tp} needs resources.gpus_per_actor={tp} "
                f"(got {res.gpus_per_actor}): one replica spans that many GPUs"
            )
        if res.gpus_per_actor == 0 and (tp > 1 or m.vllm.quantization):
            raise ValueError(
                "model.vllm.tensor_parallel_size > 1 and model.vllm.quantization need GPUs "
                "(resources.gpus_per_actor > 0)"
            )
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ \t\n"):
            raise ValueError("name must be non-empty without slashes or whitespace")
        return v


class JobConfigError(ValueError):
    """A job file that cannot run; the message names the key and what is allowed."""


def _describe(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """The description and allowed values of the field at `loc`, for error messages."""
    cls: Any = model
    field = None
    for part in loc:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            break
        field = cls.model_fields.get(str(part))
        if field is None:
            return "allowed keys: " + ", ".join(cls.model_fields)
        ann = field.annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return field.description or "" if field else ""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid job file {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        hint = _describe(JobConfig, e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg} (got {e.get('input')!r})" + (f" — {hint}" if hint else ""))
    return "\n".join(lines)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise JobConfigError(f"override {item!r} must look like key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise JobConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    return data


def parse_job(data: dict[str, Any], source: str = "<dict>", overrides: list[str] = ()) -> JobConfig:
    if not isinstance(data, dict):
        raise JobConfigError(f"invalid job file {source}: the top level must be a mapping")
    apply_overrides(data, list(overrides))
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise JobConfigError(_format_errors(err, source)) from None


def load_job(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Read and validate a job file (relative local paths in it are relative to the working dir)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise JobConfigError(f"cannot read job file {path}: {err}") from None
    return parse_job(data, str(path), overrides)
