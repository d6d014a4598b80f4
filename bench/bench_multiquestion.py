"""Multi-question rows: 1 vs 4 questions per image through InferStage, and encoder passes.

    python bench/bench_multiquestion.py                  # 128 photos, batches of 32 images
    python bench/bench_multiquestion.py --images 256 --new-tokens 16

The tiny checkpoint answers the same preprocessed photographs (real read/fetch are skipped;
pixels come from the real PreprocessStage) through the real InferStage, in one run:
  1 question    one row per image, one question each
  4 questions   one row per image with 4 questions (the `questions` list column)
  4 rows        the same 4 questions as 4 separate rows per image (what a manifest without
                multi-question rows would do): the image is decoded and encoded 4 times
Prints wall time, answers/s and images/s of each, and the vision-encoder forward calls and
images encoded per image, counted with a forward hook on `model.vision_model`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, make_photos

QUESTIONS = [
    "What is in the picture?",
    "Describe the image in detail.",
    "图中有几个人？",
    "What colour dominates the picture?",
]


def infer_batch(pixels: list[bytes], questions: list[list[str]]) -> pa.Table:
    """InferStage input rows: one per pixel blob, with its questions."""
    n = len(pixels)
    return pa.table(
        {
            "shard": ["s"] * n,
            "row": pa.array(range(n), pa.int64()),
            "id": [f"r{i}" for i in range(n)],
            "pixels": pa.array(pixels, pa.binary()),
            "questions": questions,
            "question_errors": [[None] * len(q) for q in questions],
            "history_queries": [[] for _ in range(n)],
            "history_answers": [[] for _ in range(n)],
            "image_identity": [f"e{i}" for i in range(n)],
            "row_keys": [[f"k{i}-{j}" for j in range(len(q))] for i, q in enumerate(questions)],
            "status": ["ok"] * n,
            "error": pa.nulls(n, pa.string()),
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="rows per Ray batch = per call")
    parser.add_argument("--generate-batch", type=int, default=32, help="prompts per generate")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = one core)")
    args = parser.parse_args(argv)

    import torch

    from pipeline.stages.infer import InferStage
    from pipeline.stages.preprocess import PreprocessStage
    from ziya_model import GenerationSettings, load_ziya, write_tiny_checkpoint

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_checkpoint(Path(tmp) / "tiny")
        loaded = load_ziya(tiny.visual_dir, tiny.llm_dir)
        blobs = [p.read_bytes() for p in make_photos(Path(tmp) / "images", args.images)]
    model = loaded[0]
    size = model.config.vision_config.image_size
    n = len(blobs)
    pre = PreprocessStage(size, 64_000_000)(
        pa.table({"image_bytes": blobs, "status": ["ok"] * n, "error": pa.nulls(n, pa.string())})
    )
    pixels = pre.column("pixels").to_pylist()
    settings = GenerationSettings(max_new_tokens=args.new_tokens)
    stage = InferStage(lambda: loaded, settings, args.generate_batch)

    encoded: list[int] = []
    model.vision_model.register_forward_hook(
        lambda module, inputs, output: encoded.append(int(output.last_hidden_state.shape[0]))
    )
    variants = {
        "1 question": [(p, [QUESTIONS[0]]) for p in pixels],
        "4 questions": [(p, list(QUESTIONS)) for p in pixels],
        "4 rows": [(p, [q]) for p in pixels for q in QUESTIONS],
    }
    stage(infer_batch(pixels[:4], [QUESTIONS[:1]] * 4))  # warm-up
    print(f"machine: {machine()}")
    print(
        f"tiny checkpoint, {n} photos (640x480 JPEG -> {size}x{size}), {args.batch} rows per "
        f"InferStage call, <= {args.generate_batch} prompts per generate, "
        f"max_new_tokens={args.new_tokens}, {args.threads} torch thread(s)"
    )
    results = {}
    for name, rows in variants.items():
        encoded.clear()
        answers = 0
        start = time.perf_counter()
        for i in range(0, len(rows), args.batch):
            chunk = rows[i : i + args.batch]
            out = stage(infer_batch([p for p, _ in chunk], [q for _, q in chunk]))
            answers += out.num_rows
            assert set(out.column("status").to_pylist()) == {"ok"}
        seconds = time.perf_counter() - start
        results[name] = seconds
        print(
            f"  {name:<12} {answers:5d} answers in {seconds:6.2f} s: {answers / seconds:7.1f} "
            f"answers/s, {n / seconds:6.1f} images/s; encoder calls {len(encoded)}, "
            f"{sum(encoded) / n:.2f} encodes per image"
        )
    print(
        f"4 questions per image cost {results['4 questions'] / results['1 question']:.2f}x the "
        f"time of 1; as 4 separate rows {results['4 rows'] / results['1 question']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
