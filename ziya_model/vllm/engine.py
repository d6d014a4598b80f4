"""`ZiyaVLLMEngine`: Ziya-Visual answers from vLLM, with continuous batching across callers.

    engine = ZiyaVLLMEngine(visual_dir, llm_dir, EngineOptions(dtype="bf16"))
    answers = engine.answer([Request(image=uint8_chw, query="这是什么？")], settings)

Any number of threads may call `answer` at once: their requests go into one queue, and a
single engine thread adds them to vLLM's scheduler and steps it. So the engine never drains
between callers' batches (a Ray Data actor runs several batches at once, see
`pipeline/stages/infer.py`): a new batch's prompts join the running decode as soon as they
arrive, and finished sequences free their KV blocks at once.

One source of truth for the prompt: each row's ids come from
`ziya_model.tokenization.prompt_token_ids` (the layout of `ziya_model.prompt`), with the image's
32 positions filled by the placeholder id at `image_at`; the vLLM model class scatters the image
embeddings there. Answers are decoded with the project's own tokenizer (vLLM's incremental
detokenizer drops a trailing incomplete character), exactly as the transformers engine does.

Decoding settings map onto vLLM's: greedy is temperature 0, `min_new_tokens` is `min_tokens`,
eos stops; the repetition penalty and no-repeat-n-gram rule run as transformers does them (over
the answer only) in `logits.AnswerOnlyPenalties`. Beam search has no equivalent here and is
refused with a message.

Prefix caching is on by default: the questions of one image share the blocks that cover the
image (vLLM keys them by the image's content hash) and the prompt text before the question.
`stats()` reports prompt tokens, how many of them came from the cache, and engine busy time.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import logits as zlogits
from .model_dir import build_model_dir

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "auto": "auto"}


@dataclass(frozen=True)
class EngineOptions:
    """vLLM engine settings (the job file's `model.vllm` section maps onto these)."""

    dtype: str = "auto"  # fp32 | fp16 | bf16 | auto (bf16 on GPU, fp32 on CPU)
    max_model_len: int | None = None  # None: the LLM's max_position_embeddings (2048)
    max_num_seqs: int = 256  # sequences decoded together (the roofline wants hundreds)
    gpu_memory_utilization: float = 0.90  # share of GPU memory vLLM may take (weights + KV)
    tensor_parallel_size: int = 1  # GPUs one replica spans
    quantization: str | None = None  # vLLM weight quantization, e.g. "fp8" (Hopper / Ada)
    enable_prefix_caching: bool = True  # reuse image + prompt blocks across questions
    enforce_eager: bool = False  # no CUDA graphs (tests on CPU set True)
    block_size: int | None = None  # KV block size; CPU attention needs a multiple of 32
    cpu_kvcache_gib: int | None = None  # CPU only: KV cache GiB (VLLM_CPU_KVCACHE_SPACE)
    seed: int = 0  # sampling seed (greedy decoding does not use it)
    # vLLM's engine core in its own process (None: vLLM's default, on). Off starts in ~2 s
    # instead of ~24 s on CPU; tests use that.
    multiprocessing: bool | None = None
    model_dir_cache: str | None = None  # where the linked model directory is built
    # "dummy": random weights of the config's dimensions, no weight files (bench/gpu_check.py)
    load_format: str = "auto"


@dataclass(frozen=True)
class Request:
    """One prompt: an image as [3, S, S] uint8 (fast path) or float32 (exact), and the turns."""

    image: np.ndarray
    query: str
    history_queries: Sequence[str] = ()
    history_answers: Sequence[str] = ()


@dataclass
class EngineStats:
    """Counters since the engine started (`stats()` returns a copy)."""

    requests: int = 0
    prompt_tokens: int = 0  # image positions included
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    output_tokens: int = 0
    busy_s: float = 0.0  # time with at least one request in the engine
    started: float = field(default_factory=time.perf_counter)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class EngineDead(RuntimeError):
    """The engine failed as a whole (a device error): no row's fault, the actor must restart."""


def sampling_params(settings: Any, eos_token_id: int | None):
    """vLLM `SamplingParams` equivalent to the transformers engine's decoding of `settings`."""
    from vllm import SamplingParams

    beams = int(getattr(settings, "num_beams", 1) or 1)
    if beams > 1:
        raise ValueError(
            f"num_beams={beams}: beam search is not available on the vLLM engine; use "
            "model.engine=transformers or num_beams=1"
        )
    kwargs: dict[str, Any] = {
        "max_tokens": int(settings.max_new_tokens),
        "min_tokens": int(getattr(settings, "min_new_tokens", 0) or 0),
        "stop_token_ids": [] if eos_token_id is None else [int(eos_token_id)],
        "detokenize": False,  # decoded with the project's tokenizer
        "logprobs": 0,  # the chosen token's log-prob, for Answer.mean_logprob
        "extra_args": {
            zlogits.PENALTY_KEY: float(getattr(settings, "repetition_penalty", 1.0)),
            zlogits.NGRAM_KEY: int(getattr(settings, "no_repeat_ngram_size", 0) or 0),
        },
    }
    if getattr(settings, "do_sample", False):
        kwargs.update(
            temperature=float(settings.temperature),
            top_p=float(settings.top_p),
            top_k=int(getattr(settings, "top_k", 0) or 0),
        )
    else:
        kwargs.update(temperature=0.0)
    return SamplingParams(**kwargs)


def _load_tokenizer(llm_dir: Path):
    """The project's tokenizer (the release's tokenization), as the transformers engine uses."""
    import json

    from ziya_model.tokenization import load_tokenizer

    pad = json.loads((llm_dir / "config.json").read_text()).get("pad_token_id")
    return load_tokenizer(llm_dir, pad)


class ZiyaVLLMEngine:
    """One vLLM engine holding one Ziya-Visual replica; thread-safe `answer`."""

    def __init__(self, visual_dir: str | Path, llm_dir: str | Path, options: EngineOptions):
        from transformers import Blip2Config

        self.options = options
        visual_dir, llm_dir = Path(visual_dir), Path(llm_dir)
        self.model_dir = build_model_dir(
            visual_dir, llm_dir, options.model_dir_cache, weights=options.load_format != "dummy"
        )
        self.tokenizer = _load_tokenizer(llm_dir)
        # The visual config decides the prompt (roles, prefix, layout); the directory's
        # config.json adds the placeholder id.
        self.config = Blip2Config.from_pretrained(str(self.model_dir))
        self.image_token_id = int(self.config.image_token_index)
        self.num_query_tokens = int(self.config.num_query_tokens)
        self._engine = self._start_engine()
        self._ids = itertools.count()
        self._intake: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[str, Future] = {}
        self._stats = EngineStats()
        self._stats_lock = threading.Lock()
        self._dead: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="ziya-vllm-engine", daemon=True)
        self._thread.start()

    # -- start-up ----------------------------------------------------------------------------

    def _start_engine(self):
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        from . import register

        register()  # in-process too (the entry point covers vLLM's own worker processes)
        o = self.options
        if o.cpu_kvcache_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(o.cpu_kvcache_gib)
        if o.multiprocessing is not None:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if o.multiprocessing else "0"
        kwargs: dict[str, Any] = {
            "model": str(self.model_dir),
            # Prompts arrive as ids and answers are decoded here, but vLLM's multimodal
            # processing insists on a tokenizer: the directory links the LLM's.
            "dtype": _DTYPES[o.dtype],
            "max_num_seqs": o.max_num_seqs,
            "gpu_memory_utilization": o.gpu_memory_utilization,
            "tensor_parallel_size": o.tensor_parallel_size,
            "quantization": o.quantization,
            "enable_prefix_caching": o.enable_prefix_caching,
            "enforce_eager": o.enforce_eager,
            "seed": o.seed,
            "limit_mm_per_prompt": {"image": 1},
            # Sampling defaults come from the job, never from a generation_config.json.
            "generation_config": "vllm",
            "logits_processors": [zlogits.QUALNAME],
            # Log-probs after the penalties, like the transformers engine's mean_logprob.
            "logprobs_mode": "processed_logprobs",
            "load_format": o.load_format,
        }
        if o.max_model_len is not None:
            kwargs["max_model_len"] = o.max_model_len
        if o.block_size is not None:
            kwargs["block_size"] = o.block_size
        return LLMEngine.from_engine_args(EngineArgs(**kwargs))

    # -- requests ----------------------------------------------------------------------------

    def prompt_ids(self, request: Request) -> list[int]:
        """The row's prompt ids with the image's positions filled by the placeholder id."""
        from ziya_model.tokenization import prompt_token_ids

        p = prompt_token_ids(
            self.tokenizer,
            self.config,
            request.query,
            list(request.history_queries),
            list(request.history_answers),
        )
        image = [self.image_token_id] * self.num_query_tokens
        return [*p.ids[: p.image_at], *image, *p.ids[p.image_at :]]

    def submit(self, requests: Sequence[Request], settings: Any) -> list[Future]:
        """Queue requests; each future resolves to an `Answer` or raises the row's error."""
        if self._dead is not None:
            raise EngineDead(f"the vLLM engine failed earlier: {self._dead}") from self._dead
        params = sampling_params(settings, self.tokenizer.eos_token_id)
        futures = []
        for request in requests:
            future: Future = Future()
            try:
                prompt = {
                    "prompt_token_ids": self.prompt_ids(request),
                    "multi_modal_data": {"image": request.image},
                }
            except Exception as err:  # the row's own problem (e.g. history lengths differ)
                future.set_exception(err)
            else:
                self._intake.put((str(next(self._ids)), prompt, params, future))
            futures.append(future)
        return futures

    def answer(self, requests: Sequence[Request], settings: Any) -> list[Any]:
        """Answers in request order; a row that failed gives its exception instead.

        Raises `EngineDead` when the engine itself failed (not the rows' fault).
        """
        out: list[Any] = []
        for future in self.submit(requests, settings):
            try:
                out.append(future.result())
            except EngineDead:
                raise
            except Exception as err:
                out.append(err)
        return out

    def stats(self) -> EngineStats:
        with self._stats_lock:
            return EngineStats(**{k: getattr(self._stats, k) for k in EngineStats.__annotations__})

    # -- the engine thread -------------------------------------------------------------------

    def _admit(self, block: bool) -> None:
        """Move queued requests into vLLM (blocking briefly for the first when idle)."""
        try:
            item = self._intake.get(timeout=0.05) if block else self._intake.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            request_id, prompt, params, future = item
            try:
                self._engine.add_request(request_id, prompt, params)
            except Exception as err:  # invalid input: too long, bad image, ...
                future.set_exception(err)
            else:
                self._pending[request_id] = future
            try:
                item = self._intake.get_nowait()
            except queue.Empty:
                item = None

    def _loop(self) -> None:
        try:
            while not self._closed:
                self._admit(block=not self._pending)
                if not self._pending:
                    continue
                t0 = time.perf_counter()
                outputs = self._engine.step()
                busy = time.perf_counter() - t0
                with self._stats_lock:
                    self._stats.busy_s += busy
                for output in outputs:
                    if output.finished:
                        self._finish(output)
        except BaseException as err:  # the engine itself broke: fail everything, refuse more
            self._dead = err
            dead = EngineDead(f"the vLLM engine failed: {type(err).__name__}: {err}")
            for future in self._pending.values():
                future.set_exception(dead)
            self._pending.clear()
            while True:
                try:
                    self._intake.get_nowait()[3].set_exception(dead)
                except queue.Empty:
                    break

    def _finish(self, output) -> None:
        from ziya_model import Answer

        future = self._pending.pop(output.request_id, None)
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        logprobs = [
            entry[token].logprob
            for token, entry in zip(ids, completion.logprobs or [], strict=False)
            if entry and token in entry
        ]
        with self._stats_lock:
            self._stats.requests += 1
            self._stats.prompt_tokens += len(output.prompt_token_ids or ())
            self._stats.cached_prompt_tokens += int(output.num_cached_tokens or 0)
            self._stats.output_tokens += len(ids)
        if future is None:
            return
        try:
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            kwargs: dict[str, Any] = {"text": text, "num_tokens": len(ids)}
            if "mean_logprob" in getattr(Answer, "__dataclass_fields__", {}):
                kwargs["mean_logprob"] = float(np.mean(logprobs)) if logprobs else None
            future.set_result(Answer(**kwargs))
        except Exception as err:
            future.set_exception(err)

    def close(self) -> None:
        """Stop the engine thread and release the engine (its worker process, if any)."""
        self._closed = True
        self._thread.join(timeout=30)
        engine, self._engine = self._engine, None
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
