"""Stage 4, infer: pixels + questions -> answers, in an actor pool (one model replica per actor).

Input columns:  shard, row, id, pixels, questions, question_errors, history_queries,
                history_answers, image_identity, row_keys, status, error
Output columns: shard, row, id, question_index, question, answer, status, error, num_tokens,
                mean_logprob, latency_s, row_key, image_identity — one row per question

Each image goes through the vision encoder and Q-Former once; all its questions reuse the
projected embeddings. Prompts are sorted by length before they are cut into generate batches
of equal size, so rows of similar length share a batch and padding stays small.

Keeping the device busy: Ray Data runs two calls of this stage at once per actor (see
`builder.build`). The host-side work of a call (columns to tensors, pinned-memory copy, the
non-blocking host-to-device copy and normalization, building the output table) runs outside
`_model_lock`; only the model itself (encode + generate) runs under it, one batch at a time. So
while one batch is on the model, the next one is being prepared, and the model never waits for
Python bookkeeping between batches. A generate call that fails is
retried row by row, so one bad row ends as `inference_error` instead of failing its neighbours;
CUDA out-of-memory and other device failures still propagate (they are not the row's fault).
A model call still running after `run.batch_timeout_s` ends the actor, as a crash would
(`pipeline/runtime/watchdog.py`): Ray retries its batch, and a row that hangs every time fails alone.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa

from pipeline.columns import ANSWER_SCHEMA, INFERENCE_ERROR, INVALID_QUESTION, OK, check_columns
from pipeline.guards.redact import describe_error
from pipeline.guards.text import fix_surrogates
from pipeline.runtime.roster import ActorRoster
from pipeline.runtime.watchdog import CallWatchdog

INPUT_COLUMNS = {
    "shard": "shard id",
    "row": "manifest row index",
    "id": "manifest id",
    "pixels": "uint8 or float32 [3, S, S] image (null for failed rows)",
    "questions": "cleaned questions",
    "question_errors": "per-question problem (null when usable)",
    "history_queries": "earlier questions",
    "history_answers": "earlier answers",
    "image_identity": "image version (ETag, size+mtime or hash)",
    "row_keys": "per-question reuse key",
    "status": "row status",
    "error": "row error",
}

OUTPUT_SCHEMA = ANSWER_SCHEMA  # pipeline/columns.py: the answer rows both engines emit


# Text tokens of a prompt besides the image, for the KV-cache estimate (a caption prompt is about
# 10; questions and history are longer).
PROMPT_TEXT_TOKENS = 64
# Beyond a few hundred sequences decode is compute-bound on an H100; larger batches only add
# latency and memory.
MAX_AUTO_BATCH = 256


class InferStage:
    """Holds one model replica; `__init__` runs once per actor."""

    def __init__(
        self,
        loader,
        generation,
        batch_size: int | None,
        pixel_mode: str = "fast",
        roster: ActorRoster | None = None,
        batch_timeout_s: float | None = None,
        board=None,
        stage_to=None,
    ):
        import torch

        from pipeline.runtime.metrics import ActorMetrics

        if roster is not None:
            # Before the model loads: `run` can stop this actor even if loading never ends.
            roster.register_current_actor()
        t0 = time.perf_counter()
        self.model, self.tokenizer, self.processor = loader()
        self.device = next(self.model.parameters()).device
        self.dtype = self.model.language_model.dtype
        self.generation = generation
        self.pixel_mode = pixel_mode
        self.batch_size = batch_size or self._auto_batch_size(torch)
        # One batch at a time on the model; preparation of the next runs beside it.
        self._model_lock = threading.Lock()
        self.metrics = ActorMetrics()
        self.metrics.model_loaded(time.perf_counter() - t0)
        # Ends this actor when a model call hangs (see watchdog.py); loading is not guarded.
        self.watchdog = CallWatchdog(batch_timeout_s)
        # The run's efficiency figures (pipeline/runtime/efficiency.py): what each call did, and this
        # actor's wall time since its model was ready, added to the driver's board.
        self._board = board
        self._figures_lock = threading.Lock()
        # `run` passes the write stage (stages/write.py): the answers are staged from here,
        # outside the model lock, and only the write stage's small report leaves the actor (no
        # further hop of the rows, and no task of their own for Ray Data to schedule).
        self.stage_to = stage_to
        self._mark = time.perf_counter()

    def _auto_batch_size(self, torch) -> int:
        """Prompts per generate call: what the KV cache fits in 60% of free GPU memory; 8 on CPU.

        KV cache per token and sequence = 2 (K, V) x layers x kv_heads x head_dim x bytes per
        element: 0.8 MB for LLaMA-13B in bf16 (40 x 5120 x 2 x 2), times prompt + answer tokens.
        The other 40% covers activations and the vision encoder's batch.
        """
        if self.device.type != "cuda":
            return 8
        placed = getattr(self.model.language_model, "hf_device_map", None) or {}
        if len(set(placed.values())) > 1:  # model.device_map=auto: the KV cache spreads too
            free = sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
        else:
            free, _ = torch.cuda.mem_get_info(self.device)
        cfg = self.model.language_model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        element = torch.finfo(self.dtype).bits // 8
        per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * element
        tokens = PROMPT_TEXT_TOKENS + self.model.config.num_query_tokens
        tokens += self.generation.max_new_tokens
        # Beam search keeps num_beams sequences (and their KV cache) per prompt.
        per_prompt = per_token * tokens * self.generation.num_beams
        return int(max(1, min(MAX_AUTO_BATCH, 0.6 * free // max(per_prompt, 1))))

    def _pixel_tensor(self, column, indices: list[int]):
        """The rows' pixels as one normalized [n, 3, S, S] tensor on the model's device.

        The bytes go from the Arrow buffer straight into one (pinned, on GPU) host buffer, are
        copied to the device without blocking the host, and are normalized there.
        """
        import torch

        size = self.processor.image_size
        fast = self.pixel_mode == "fast"
        nbytes = 3 * size * size * (1 if fast else 4)  # uint8, or float32 in exact mode
        pinned = self.device.type == "cuda"
        host = torch.empty((len(indices), nbytes), dtype=torch.uint8, pin_memory=pinned)
        _copy_binary_rows(column, indices, host.numpy())
        pixels = host if fast else host.view(torch.float32)
        pixels = pixels.view(len(indices), 3, size, size).to(self.device, non_blocking=pinned)
        dtype = self.model.vision_model.dtype
        return self.processor.normalize(pixels, dtype) if fast else pixels.to(dtype)

    def _answer(self, embeds, jobs: list[tuple[int, str, tuple]]) -> list:
        """Answer (image index, question, history) prompts, longest first, in equal chunks."""
        order = sorted(range(len(jobs)), key=lambda j: -_prompt_chars(jobs[j]))
        answers: list = [None] * len(jobs)
        # Equal chunks (e.g. 2 x 20 rather than 32 + 8): the same number of generate calls, and
        # no short last call that costs about as much as a full one.
        chunks = -(-len(order) // self.batch_size)
        size = -(-len(order) // max(chunks, 1))
        for c in range(0, len(order), size):
            chunk = order[c : c + size]
            try:
                got = self._generate(embeds, [jobs[j] for j in chunk])
            except Exception as err:
                if _is_device_failure(err):
                    raise
                got = [self._generate_one(embeds, jobs[j]) for j in chunk]
            for j, a in zip(chunk, got, strict=True):
                answers[j] = a
        return answers

    def _generate(self, embeds, jobs):
        with self.watchdog.guard(f"answer_batch({len(jobs)} prompts)"):
            return self.model.answer_batch(
                self.tokenizer,
                queries=[q for _, q, _ in jobs],
                image_embeds=embeds,
                image_index=[i for i, _, _ in jobs],
                histories=[h for _, _, h in jobs],
                generation=self.generation,
            )

    def _generate_one(self, embeds, job):
        try:
            return self._generate(embeds, [job])[0]
        except Exception as err:
            if _is_device_failure(err):
                raise
            return err

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        check_columns("InferStage", batch, INPUT_COLUMNS)
        t0 = time.perf_counter()
        pixel_column = batch.column("pixels")
        # Pixels stay in Arrow memory; only the small columns become Python objects.
        rows = batch.drop_columns(["pixels"]).to_pylist()
        has_pixels = pixel_column.is_valid().to_pylist()
        images = [i for i, r in enumerate(rows) if r["status"] == OK and has_pixels[i]]
        jobs, owners = [], []
        for k, i in enumerate(images):
            r = rows[i]
            history = (r["history_queries"] or [], r["history_answers"] or [])
            for qi, (q, problem) in enumerate(
                zip(r["questions"], r["question_errors"], strict=True)
            ):
                if problem is None:
                    jobs.append((k, q, history))
                    owners.append((i, qi))
        answers: dict[tuple[int, int], object] = {}
        waited = model_s = 0.0
        if jobs:
            with torch.inference_mode():
                pixels = self._pixel_tensor(pixel_column, images)
                start = time.perf_counter()
                with self._model_lock:
                    waited = time.perf_counter() - start
                    with self.watchdog.guard(f"encode_images({len(images)} images)"):
                        embeds = self.model.encode_images(pixels)
                    got = self._answer(embeds, jobs)
                    model_s = time.perf_counter() - start - waited
                for owner, a in zip(owners, got, strict=True):
                    answers[owner] = a
        latency = time.perf_counter() - t0 - waited  # this batch's own time, not its queueing
        out = []
        for i, r in enumerate(rows):
            for qi, (q, problem) in enumerate(
                zip(r["questions"], r["question_errors"], strict=True)
            ):
                status, error, answer, ntok, logprob = r["status"], r["error"], None, 0, None
                if status == OK and problem is not None:
                    status, error = INVALID_QUESTION, problem
                elif (i, qi) in answers:
                    a = answers[(i, qi)]
                    if isinstance(a, Exception):
                        status, error = INFERENCE_ERROR, fix_surrogates(describe_error(a, 1000))
                    else:
                        # A decoder can emit a lone surrogate; Arrow would fail the whole batch.
                        answer, ntok = fix_surrogates(a.text), a.num_tokens
                        logprob = a.mean_logprob
                out.append(
                    {
                        "shard": r["shard"],
                        "row": r["row"],
                        "id": r["id"],
                        "question_index": qi,
                        "question": q,
                        "answer": answer,
                        "status": status,
                        "error": error,
                        "num_tokens": ntok,
                        "mean_logprob": logprob,
                        "latency_s": latency,
                        "row_key": r["row_keys"][qi] if r["row_keys"] else None,
                        "image_identity": r["image_identity"],
                    }
                )
        self.metrics.batch_done(out, latency, len(images))
        self._record_figures(len(images) if jobs else 0, model_s)
        answers = pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)
        return answers if self.stage_to is None else self.stage_to(answers)

    def _call_figures(self, images: int, model_s: float) -> dict:
        """What one call did, for the run's efficiency figures: images encoded and seconds on
        the model (under the model lock). The vLLM stage reports its engine's own counters."""
        return {"images": images, "busy_s": model_s}

    def _record_figures(self, images: int, model_s: float) -> None:
        from pipeline.runtime.efficiency import send

        with self._figures_lock:
            now = time.perf_counter()
            delta = self._call_figures(images, model_s)
            delta["actor_wall_s"] = now - self._mark
            self._mark = now
        # Before the rows are returned: the driver's totals are complete at the last commit.
        send(self._board, delta)


def _prompt_chars(job: tuple[int, str, tuple]) -> int:
    """Length of a prompt's text in characters: question plus every earlier turn."""
    _, question, (queries, answers) = job
    return len(question) + sum(map(len, queries)) + sum(map(len, answers))


def _copy_binary_rows(column, indices: list[int], out: np.ndarray) -> None:
    """Copy the values of `indices` of a binary Arrow column into the rows of `out` [n, nbytes].

    Reads the Arrow offsets and data buffers directly: no Python bytes objects, one copy.
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    wide = pa.types.is_large_binary(arr.type)
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64 if wide else np.int32)
    offsets = offsets[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0)
    nbytes = out.shape[1]
    for k, i in enumerate(indices):
        start, end = int(offsets[i]), int(offsets[i + 1])
        if end - start != nbytes:
            raise ValueError(
                f"InferStage: row {i} has {end - start} pixel bytes, expected {nbytes} "
                "(preprocessing and model disagree on image size or pixel mode)"
            )
        out[k] = data[start:end]


def _is_device_failure(err: Exception) -> bool:
    """Errors that are the device's, not the row's: propagate so Ray restarts the actor."""
    name = type(err).__name__
    return "OutOfMemory" in name or "CUDA" in str(err)[:200] or isinstance(err, MemoryError)
