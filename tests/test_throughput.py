"""Throughput properties of the model stage, on the real InferStage and the tiny checkpoint.

- multi-question rows encode each image once: one vision-encoder forward per batch, covering
  exactly the batch's images (counted with a forward hook on `model.vision_model`), and every
  question's answer equals `chat()` on that image alone;
- failed rows never reach the encoder;
- prompts are sorted by length and cut into equal generate chunks;
- two concurrent calls (Ray runs two per actor) never overlap on the model;
- the KV-cache batch size uses 0.8 MB per token per sequence for LLaMA-13B in bf16;
- pixel bytes are read straight from Arrow buffers, whatever the chunking or offset width.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.stages.infer import InferStage, _copy_binary_rows
from pipeline.stages.preprocess import PreprocessStage
from ziya_model import GenerationSettings, load_ziya

QUESTIONS = [
    "What is in the picture?",
    "Describe the image in detail, please, with colours and shapes.",
    "图中有几个人？",
    "Is it outdoors?",
]
MAX_NEW_TOKENS = 4


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_ziya(tiny_checkpoint.visual_dir, tiny_checkpoint.llm_dir)


@pytest.fixture(scope="module")
def photos(photo_dir) -> list[bytes]:
    return [p.read_bytes() for p in sorted(photo_dir.glob("*.jpg"))]


def _stage(loaded, batch_size: int) -> InferStage:
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    return InferStage(lambda: loaded, settings, batch_size)


def _batch(photos: list[bytes], questions: list[list[str]], broken: frozenset = frozenset()):
    """InferStage input: real photos through the real PreprocessStage; rows in `broken` carry
    bytes that are not an image (they end as decode_error before the model stage)."""
    n = len(questions)
    blobs = [b"not an image" if i in broken else photos[i % len(photos)] for i in range(n)]
    pre = PreprocessStage(224, 10_000_000)(
        pa.table({"image_bytes": blobs, "status": ["ok"] * n, "error": pa.nulls(n, pa.string())})
    )
    return pa.table(
        {
            "shard": ["s"] * n,
            "row": pa.array(range(n), pa.int64()),
            "id": [f"r{i}" for i in range(n)],
            "pixels": pre.column("pixels"),
            "questions": questions,
            "question_errors": [[None] * len(q) for q in questions],
            "history_queries": [[] for _ in range(n)],
            "history_answers": [[] for _ in range(n)],
            "image_identity": [f"e{i}" for i in range(n)],
            "row_keys": [[f"k{i}-{j}" for j in range(len(q))] for i, q in enumerate(questions)],
            "status": pre.column("status"),
            "error": pre.column("error"),
        }
    )


class _EncoderCounter:
    """Counts vision-encoder forward calls and the images each one covered."""

    def __init__(self, model):
        self.calls: list[int] = []
        self.handle = model.vision_model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls.append(int(output.last_hidden_state.shape[0]))

    def close(self):
        self.handle.remove()


def test_multi_question_rows_encode_each_image_once(loaded, photos):
    model, tokenizer, processor = loaded
    images = 6
    batch = _batch(photos, [list(QUESTIONS)] * images)
    stage = _stage(loaded, batch_size=8)
    counter = _EncoderCounter(model)
    try:
        out = stage(batch)
    finally:
        counter.close()
    assert counter.calls == [images], "one encoder forward for the whole batch, all its images"
    assert sum(counter.calls) == images  # images encoded == images, with 4 questions each
    rows = out.to_pylist()
    assert len(rows) == images * len(QUESTIONS)
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]

    # Reusing one image's embeddings for its 4 questions gives what chat() gives on it alone
    # (every question of the first image, the first question of the others: keeps it fast).
    for r in (r for r in rows if r["row"] == 0 or r["question_index"] == 0):
        pixels = processor.normalize(
            torch.from_numpy(
                np.frombuffer(batch.column("pixels")[r["row"]].as_py(), np.uint8)
                .reshape(3, 224, 224)
                .copy()
            )
        )
        alone = model.chat(tokenizer, pixels, r["question"], max_new_tokens=MAX_NEW_TOKENS)
        assert r["answer"] == alone, (r["id"], r["question"])


def test_failed_rows_are_not_encoded(loaded, photos):
    model, _, _ = loaded
    batch = _batch(photos, [QUESTIONS[:2]] * 5, broken=frozenset({1, 3}))
    counter = _EncoderCounter(model)
    try:
        out = _stage(loaded, batch_size=8)(batch)
    finally:
        counter.close()
    assert counter.calls == [3]
    statuses = [(r["id"], r["status"]) for r in out.to_pylist()]
    assert statuses.count(("r1", "decode_error")) == 2 and statuses.count(("r0", "ok")) == 2


def test_prompts_sorted_by_length_in_equal_chunks(loaded, photos):
    model, _, _ = loaded
    questions = [[q] for q in ("a?", "b" * 60 + "?", "cc?", "d" * 40 + "?", "e?")] * 2
    batch = _batch(photos, questions)
    calls: list[list[str]] = []
    original = model.answer_batch

    def recording(tokenizer, queries, image_embeds, **kwargs):
        calls.append(list(queries))
        return original(tokenizer, queries=queries, image_embeds=image_embeds, **kwargs)

    model.answer_batch = recording
    try:
        out = _stage(loaded, batch_size=8)(batch)
    finally:
        del model.answer_batch  # back to the class method
    # 10 prompts with at most 8 per call: two calls of 5, not 8 + 2.
    assert [len(c) for c in calls] == [5, 5]
    lengths = [[len(q) for q in c] for c in calls]
    assert min(lengths[0]) >= max(lengths[1]), lengths  # the long prompts share a call
    assert out.num_rows == 10 and set(out.column("status").to_pylist()) == {"ok"}


def test_concurrent_calls_never_overlap_on_the_model(loaded, photos):
    """Ray runs two calls per actor at once; only one may be on the model at any moment."""
    model, _, _ = loaded
    stage = _stage(loaded, batch_size=8)
    state = {"inside": 0, "most": 0}
    lock = threading.Lock()
    original = model.encode_images

    def guarded(pixels):
        with lock:
            state["inside"] += 1
            state["most"] = max(state["most"], state["inside"])
        time.sleep(0.05)  # widen the window in which an overlap would show
        try:
            return original(pixels)
        finally:
            with lock:
                state["inside"] -= 1

    model.encode_images = guarded
    results: dict[int, pa.Table] = {}
    try:
        batches = [_batch(photos, [QUESTIONS[:2]] * 3), _batch(photos, [QUESTIONS[2:]] * 4)]
        threads = [
            threading.Thread(target=lambda k=k: results.__setitem__(k, stage(batches[k])))
            for k in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del model.encode_images
    assert state["most"] == 1
    assert results[0].num_rows == 6 and results[1].num_rows == 8
    assert set(results[0].column("status").to_pylist()) == {"ok"}
    assert set(results[1].column("status").to_pylist()) == {"ok"}


def test_auto_batch_size_uses_the_kv_cache_per_token(tiny_checkpoint):
    """LLaMA-13B in bf16: 2 x 40 layers x 5120 x 2 bytes = 0.8 MB (819,200 B) per token."""
    from transformers import LlamaConfig

    llama13b = LlamaConfig(
        hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, intermediate_size=13824
    )
    stage = object.__new__(InferStage)
    stage.device = torch.device("cuda")
    stage.dtype = torch.bfloat16
    stage.generation = GenerationSettings(max_new_tokens=64)
    stage.model = SimpleNamespace(
        language_model=SimpleNamespace(config=llama13b),
        config=SimpleNamespace(num_query_tokens=32),
    )
    per_seq = 819_200 * (64 + 32 + 64)  # prompt text + image queries + answer
    for want in (1, 37, 200):
        free = int(want * per_seq / 0.6) + 1
        fake = SimpleNamespace(
            cuda=SimpleNamespace(mem_get_info=lambda device, f=free: (f, 80 * 2**30)),
            finfo=torch.finfo,
        )
        assert stage._auto_batch_size(fake) == want
    huge = SimpleNamespace(
        cuda=SimpleNamespace(mem_get_info=lambda device: (2**45, 2**45)), finfo=torch.finfo
    )
    assert stage._auto_batch_size(huge) == 256  # capped: beyond this only latency grows


@pytest.mark.parametrize("kind", ["binary", "large_binary", "chunked_slice"])
def test_pixel_rows_come_straight_from_arrow_buffers(kind):
    rng = np.random.default_rng(0)
    values = [rng.integers(0, 256, 12, dtype=np.uint8).tobytes() for _ in range(6)]
    if kind == "binary":
        column = pa.array(values, pa.binary())
    elif kind == "large_binary":
        column = pa.array(values, pa.large_binary())
    else:
        column = pa.chunked_array([pa.array(values[:3]), pa.array(values[3:])]).slice(1)
        values = values[1:]
    out = np.zeros((3, 12), np.uint8)
    _copy_binary_rows(column, [0, 2, 4], out)
    assert [bytes(r) for r in out] == [values[0], values[2], values[4]]
    with pytest.raises(ValueError, match="InferStage: row 1 has 12 pixel bytes, expected 16"):
        _copy_binary_rows(column, [1], np.zeros((1, 16), np.uint8))
