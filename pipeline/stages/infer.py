"""Stage 4, infer: pixels + questions -> answers, in an actor pool (one model replica per actor).

Input columns:  shard, row, id, pixels, questions, question_errors, history_queries,
                history_answers, image_identity, row_keys, status, error
Output columns: shard, row, id, question_index, question, answer, status, error, num_tokens,
                latency_s, row_key, image_identity — one row per question

Each image goes through the vision encoder and Q-Former once; all its questions reuse the
projected embeddings. Prompts are sorted by length before they are cut into generate batches,
so rows of similar length share a batch and padding stays small. A generate call that fails is
retried row by row, so one bad row ends as `inference_error` instead of failing its neighbours;
CUDA out-of-memory and other device failures still propagate (they are not the row's fault).
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipeline.columns import INFERENCE_ERROR, INVALID_QUESTION, OK, check_columns
from pipeline.redact import describe_error
from pipeline.text import fix_surrogates

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

OUTPUT_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("row", pa.int64()),
        ("id", pa.string()),
        ("question_index", pa.int32()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("num_tokens", pa.int32()),
        ("latency_s", pa.float32()),
        ("row_key", pa.string()),
        ("image_identity", pa.string()),
    ]
)


class InferStage:
    """Holds one model replica; `__init__` runs once per actor."""

    def __init__(self, loader, generation, batch_size: int | None, pixel_mode: str = "fast"):
        import torch

        from pipeline.metrics import ActorMetrics

        t0 = time.perf_counter()
        self.model, self.tokenizer, self.processor = loader()
        self.device = next(self.model.parameters()).device
        self.dtype = self.model.language_model.dtype
        self.generation = generation
        self.pixel_mode = pixel_mode
        self.batch_size = batch_size or self._auto_batch_size(torch)
        self.metrics = ActorMetrics()
        self.metrics.model_loaded(time.perf_counter() - t0)

    def _auto_batch_size(self, torch) -> int:
        """Prompts per generate call: from free device memory on GPU, 8 on CPU."""
        if self.device.type != "cuda":
            return 8
        free, _ = torch.cuda.mem_get_info(self.device)
        cfg = self.model.language_model.config
        tokens = 64 + self.model.config.num_query_tokens + self.generation.max_new_tokens
        per_seq = 2 * cfg.num_hidden_layers * cfg.hidden_size * 2 * tokens  # K and V, bf16
        return int(max(1, min(256, 0.6 * free // max(per_seq, 1))))

    def _pixel_tensor(self, blobs: list[bytes]):
        import torch

        size = self.processor.image_size
        if self.pixel_mode == "fast":
            arr = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), 3, size, size)
            t = torch.from_numpy(arr.copy()).to(self.device, non_blocking=True)
            return self.processor.normalize(t, self.model.vision_model.dtype)
        arr = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), 3, size, size)
        return torch.from_numpy(arr.copy()).to(self.device, dtype=self.model.vision_model.dtype)

    def _answer(self, embeds, jobs: list[tuple[int, str, tuple]]) -> list:
        """Answer (image index, question, history) prompts, longest first, in chunks."""
        order = sorted(
            range(len(jobs)), key=lambda j: -len(jobs[j][1]) - sum(map(len, jobs[j][2][0]))
        )
        answers: list = [None] * len(jobs)
        for c in range(0, len(order), self.batch_size):
            chunk = order[c : c + self.batch_size]
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
        rows = batch.to_pylist()
        images = [i for i, r in enumerate(rows) if r["status"] == OK and r["pixels"] is not None]
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
        if jobs:
            with torch.inference_mode():
                embeds = self.model.encode_images(
                    self._pixel_tensor([rows[i]["pixels"] for i in images])
                )
                for owner, a in zip(owners, self._answer(embeds, jobs), strict=True):
                    answers[owner] = a
        latency = time.perf_counter() - t0
        out = []
        for i, r in enumerate(rows):
            for qi, (q, problem) in enumerate(
                zip(r["questions"], r["question_errors"], strict=True)
            ):
                status, error, answer, ntok = r["status"], r["error"], None, 0
                if status == OK and problem is not None:
                    status, error = INVALID_QUESTION, problem
                elif (i, qi) in answers:
                    a = answers[(i, qi)]
                    if isinstance(a, Exception):
                        status, error = INFERENCE_ERROR, fix_surrogates(describe_error(a, 1000))
                    else:
                        # A decoder can emit a lone surrogate; Arrow would fail the whole batch.
                        answer, ntok = fix_surrogates(a.text), a.num_tokens
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
                        "latency_s": latency,
                        "row_key": r["row_keys"][qi] if r["row_keys"] else None,
                        "image_identity": r["image_identity"],
                    }
                )
        self.metrics.batch_done(out, latency, len(images))
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)


def _is_device_failure(err: Exception) -> bool:
    """Errors that are the device's, not the row's: propagate so Ray restarts the actor."""
    name = type(err).__name__
    return "OutOfMemory" in name or "CUDA" in str(err)[:200] or isinstance(err, MemoryError)
