"""Stage 4, infer, on the vLLM engine (`model.engine: vllm`): the same stage, another engine.

Input and output columns are `InferStage`'s (pipeline/stages/infer.py): this class is that stage
with the model swapped, not a stage of its own, so statuses, per-row errors, the output rows and
the exactly-once commit behind them are the same code for both engines. What changes:

- The actor holds a `ZiyaVLLMEngine` (ziya_model/vllm/engine.py) instead of a transformers
  model. Pixels go to it as the uint8 (fast) or float32 (exact) arrays preprocessing made; the
  vision encoder runs inside vLLM, once per image, and a multi-question row's questions are
  separate requests that share the image's cached KV blocks (prefix caching).
- No model lock: Ray Data runs `model.vllm.batches_in_flight` calls of this actor at once (see
  `builder.build`), and each call's prompts join the engine's running batch as they arrive, so
  the engine never drains between Ray Data batches (continuous batching).
- A row vLLM refuses (e.g. a prompt longer than the context) fails alone as `inference_error`;
  an engine failure (device error, dead worker) propagates and Ray restarts the actor.
- Engine figures (prompt tokens, prefix-cache hits, busy time) go to Ray's metrics and, as
  deltas after each call, to the run's `EfficiencyBoard` (pipeline/runtime/efficiency.py), from which
  the driver writes the summary's `engine` and `efficiency` sections.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from pipeline.config import JobConfig
from pipeline.stages.infer import InferStage, _copy_binary_rows


@dataclass(frozen=True)
class VLLMLoader:
    """A picklable recipe that starts the vLLM engine inside an actor (weights local first)."""

    job: JobConfig
    board: object | None = None  # unused: the stage gets the run's EfficiencyBoard itself

    def engine_options(self):
        from ziya_model.vllm.engine import EngineOptions

        job, v = self.job, self.job.model.vllm
        gpu = job.resources.gpus_per_actor > 0
        dtype = job.model.dtype if job.model.dtype != "auto" else ("bf16" if gpu else "fp32")
        return EngineOptions(
            dtype=dtype,
            max_model_len=v.max_model_len,
            max_num_seqs=v.max_num_seqs,
            gpu_memory_utilization=v.gpu_memory_utilization,
            tensor_parallel_size=v.tensor_parallel_size,
            quantization=v.quantization,
            enable_prefix_caching=v.enable_prefix_caching,
            enforce_eager=v.enforce_eager,
            block_size=v.block_size,
            cpu_kvcache_gib=None if gpu else v.cpu_kvcache_gib,
            multiprocessing=v.multiprocessing,
            model_dir_cache=job.model.cache_dir,
        )

    def __call__(self):
        from pipeline.runtime.weights import ensure_local
        from ziya_model.processing import ZiyaImageProcessor
        from ziya_model.vllm.engine import ZiyaVLLMEngine

        job = self.job
        visual = ensure_local(job.model.visual, job.model.cache_dir, job.storage)
        llm = ensure_local(job.model.llm, job.model.cache_dir, job.storage)
        engine = ZiyaVLLMEngine(visual, llm, self.engine_options())
        processor = ZiyaImageProcessor(int(engine.config.vision_config.image_size))
        return _EngineModel(engine), engine.tokenizer, processor


class _EngineModel:
    """Stands where `InferStage` expects the transformers model: images pass through unencoded
    (vLLM encodes them), and the attributes the stage reads exist."""

    def __init__(self, engine):
        import torch

        self.engine = engine
        self._param = torch.empty(0)
        self.language_model = SimpleNamespace(dtype=torch.float32)
        self.vision_model = SimpleNamespace(dtype=torch.float32)

    def parameters(self):
        return iter([self._param])  # CPU: the engine owns the devices

    def encode_images(self, pixels):
        return pixels


class VLLMInferStage(InferStage):
    """`InferStage` answering through vLLM; `__init__` starts one engine per actor."""

    def __init__(self, loader, generation, batch_size, pixel_mode="fast", roster=None, **kw):
        super().__init__(loader, generation, batch_size, pixel_mode, roster, **kw)
        self.engine = self.model.engine
        # Calls run side by side: the engine batches their prompts together.
        self._model_lock = contextlib.nullcontext()
        self._reported = self.engine.stats()
        self._engine_metrics = _EngineMetrics()

    def _pixel_tensor(self, column, indices: list[int]) -> list[np.ndarray]:
        """The rows' images as [3, S, S] arrays (uint8 fast path, float32 exact mode)."""
        size = self.processor.image_size
        fast = self.pixel_mode == "fast"
        nbytes = 3 * size * size * (1 if fast else 4)
        host = np.empty((len(indices), nbytes), dtype=np.uint8)
        _copy_binary_rows(column, indices, host)
        pixels = host if fast else host.view(np.float32)
        return list(pixels.reshape(len(indices), 3, size, size))

    def _answer(self, embeds, jobs) -> list:
        from ziya_model.vllm.engine import Request

        requests = [Request(embeds[k], q, hq, ha) for k, q, (hq, ha) in jobs]
        guard = getattr(self, "watchdog", None)
        with guard.guard(f"vLLM({len(jobs)} prompts)") if guard else contextlib.nullcontext():
            answers = self.engine.answer(requests, self.generation)
        return answers

    def _call_figures(self, images: int, model_s: float) -> dict:
        """The engine's counters since the last call that reported (under the figures lock):
        its own busy time, not this call's, since calls overlap on one engine."""
        stats = self.engine.stats()
        delta = {f: getattr(stats, f) - getattr(self._reported, f) for f in _COUNTED}
        self._reported = stats
        self._engine_metrics.record(delta)
        return {**delta, "images": images}

    def engine_stats(self):
        return self.engine.stats()


class _EngineMetrics:
    """Prefix-cache and busy-time counters through Ray's metrics API (Prometheus)."""

    def __init__(self):
        from ray.util import metrics

        from pipeline.runtime.metrics import PREFIX

        self.prompt = metrics.Counter(
            f"{PREFIX}_vllm_prompt_tokens_total", description="Prompt tokens sent to vLLM."
        )
        self.cached = metrics.Counter(
            f"{PREFIX}_vllm_cached_prompt_tokens_total",
            description="Prompt tokens vLLM served from its prefix cache.",
        )
        self.busy = metrics.Counter(
            f"{PREFIX}_vllm_busy_seconds_total",
            description="Seconds the engine had requests to run.",
        )
        self.t0 = time.perf_counter()

    def record(self, delta: dict) -> None:
        for counter, field in (
            (self.prompt, "prompt_tokens"),
            (self.cached, "cached_prompt_tokens"),
            (self.busy, "busy_s"),
        ):
            if delta[field] > 0:
                counter.inc(delta[field])


_COUNTED = ("requests", "prompt_tokens", "cached_prompt_tokens", "output_tokens", "busy_s")


def engine_section(totals: dict, wall_s: float, actors: int) -> dict:
    """The run summary's `engine` section, from the run's `EfficiencyBoard` totals."""
    t = {k: totals.get(k, 0) for k in _COUNTED}
    wall = totals.get("actor_wall_s") or wall_s * actors
    return {
        "name": "vllm",
        **{k: round(v, 3) if isinstance(v, float) else int(v) for k, v in t.items()},
        "prefix_cache_hit_rate": round(t["cached_prompt_tokens"] / t["prompt_tokens"], 4)
        if t["prompt_tokens"]
        else 0.0,
        # Share of the actors' time (model ready to last call) the engine had work.
        "busy_fraction": round(min(t["busy_s"] / wall, 1.0), 4) if wall > 0 else 0.0,
    }
