"""Model throughput benchmarks for Ziya-Visual (figures printed from one run).

    python bench/bench_model.py                    # batched answer_batch (32) vs chat() one by one
    python bench/bench_model.py --real-dims        # real architecture, random bf16 weights, CUDA
    python bench/bench_model.py --tiny-dims        # the same sweep at tiny size (runs on CPU)

Default: the tiny checkpoint (written to a temp dir, loaded through `load_ziya`), the same rows
(real photographs, varied questions, some with history) answered by `answer_batch` in batches
of 32 (one vision forward per batch) and by `chat()` one row at a time, up to 64 new tokens
each (a caption's length); prints rows/s of each, the ratio (target >= 10x) and asserts
identical greedy answers. Chunks of 32 rows alternate between the two paths so that load from
other processes slows both alike; one CPU thread unless --threads.

Sweep (`--real-dims` / `--tiny-dims`): a model built from the config with random weights
(ViT-g 1408x39, Q-Former 768, LLaMA-13B 5120x40, vocab 39424 for real dims; bf16 on CUDA,
fp32 on CPU) captions random images with min_new_tokens = max_new_tokens = 64, so the work does
not depend on weight values. Prints images/s per batch size and the fraction of the compute
roofline: FLOPs per image counted from the parameters (2 x params x tokens for the ViT over its
patches, the Q-Former over its queries, the LLaMA over prompt + generated tokens; attention
ignored, ~3.3 TFLOP at real dims) against `--peak-tflops` (800 for an H100 in bf16).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ziya_model import (
    GenerationSettings,
    ZiyaBlip2ForCausalLM,
    ZiyaImageProcessor,
    load_ziya,
    real_dims_config,
    write_tiny_checkpoint,
    ziya_config,
)
from ziya_model.configuration import image_size
from ziya_model.tiny import TINY_QFORMER, TINY_TEXT, TINY_VISION, build_tiny_tokenizer

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]
QUESTIONS = [
    "Describe the image in detail.",
    "What is in the picture?",
    "这张图片里有什么？请详细描述这张图片。",
    "How many people are there?",
    "What color is the car? Please answer the question about the image.",
    "Is there a dog?",
    "图中有几个人？",
]
HISTORY = (["What is it?"], ["A photo."])
CAPTION = "Describe the image in detail."


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_batched_with_chat(rows: int, batch: int, new_tokens: int) -> None:
    """answer_batch in batches of `batch` vs chat() one row at a time, same rows."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_checkpoint(tmp)
        model, tokenizer, processor = load_ziya(tiny.visual_dir, tiny.llm_dir, device=str(device))
    photos = [Image.fromarray(getattr(data, name)()) for name in PHOTOS]
    pixels = processor([photos[i % len(photos)] for i in range(rows)]).to(device)
    queries = [QUESTIONS[i % len(QUESTIONS)] for i in range(rows)]
    histories = [HISTORY if i % 3 == 0 else None for i in range(rows)]
    settings = GenerationSettings(max_new_tokens=new_tokens)

    def batched(start: int, stop: int) -> list[str]:
        embeds = model.encode_images(pixels[start:stop])  # one vision forward per batch
        answers = model.answer_batch(
            tokenizer,
            queries[start:stop],
            embeds,
            histories=histories[start:stop],
            generation=settings,
        )
        return [a.text for a in answers]

    def one_by_one(start: int, stop: int) -> list[str]:
        texts = []
        for i in range(start, stop):
            past = histories[i] or ([], [])
            texts.append(
                model.chat(tokenizer, pixels[i : i + 1], queries[i], past[0], past[1], new_tokens)
            )
        return texts

    batched(0, min(batch, rows))  # warm-up both paths (allocator, first-call costs)
    one_by_one(0, 1)
    batched_texts: list[str] = []
    single_texts: list[str] = []
    batched_s = single_s = 0.0
    # Interleaved chunk by chunk, so load from other processes hits both paths alike.
    for start in range(0, rows, batch):
        stop = min(start + batch, rows)
        tick = time.perf_counter()
        batched_texts += batched(start, stop)
        _sync(device)
        tock = time.perf_counter()
        single_texts += one_by_one(start, stop)
        _sync(device)
        batched_s += tock - tick
        single_s += time.perf_counter() - tock

    same = sum(a == b for a, b in zip(batched_texts, single_texts, strict=True))
    print(
        f"device {device} ({torch.get_num_threads()} CPU threads), tiny checkpoint, {rows} rows, "
        f"max_new_tokens={new_tokens}"
    )
    print(f"  answer_batch (batch {batch}): {rows / batched_s:8.1f} rows/s ({batched_s:.2f} s)")
    print(f"  chat() one by one:          {rows / single_s:8.1f} rows/s ({single_s:.2f} s)")
    print(f"  throughput ratio: {single_s / batched_s:.1f}x (target >= 10x)")
    print(f"  identical greedy answers: {same}/{rows}")
    assert same == rows, "batched greedy answers differ from chat()"


def _flops_per_image(model: ZiyaBlip2ForCausalLM, prompt_tokens: int, new_tokens: int) -> float:
    """2 x params x tokens per part (matmul FLOPs; attention and embeddings lookups ignored)."""
    config = model.config
    size, patch = image_size(config), config.vision_config.patch_size
    vision_tokens = (size // patch) ** 2 + 1
    vision = sum(p.numel() for p in model.vision_model.parameters())
    qformer = sum(p.numel() for p in model.qformer.parameters())
    lm = model.language_model
    lm_body = sum(p.numel() for p in lm.model.layers.parameters())
    lm_head = lm.lm_head.weight.numel()
    return 2.0 * (
        vision * vision_tokens
        + qformer * config.num_query_tokens
        + lm_body * (prompt_tokens + new_tokens)
        + lm_head * new_tokens  # prefill keeps logits for the last position only
    )


def sweep(real: bool, batch_sizes: list[int], repeats: int, new_tokens: int, peak: float) -> None:
    """Captioning images/s at several batch sizes, random weights, fixed generated length."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if real and device.type != "cuda":
        sys.exit("--real-dims needs a CUDA device (13 B parameters); use --tiny-dims on CPU")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = build_tiny_tokenizer()  # ids fit both vocabularies; prompt lengths are similar
    if real:
        config = real_dims_config()
    else:
        config = ziya_config(
            vision_config=TINY_VISION,
            qformer_config=TINY_QFORMER,
            text_config={**TINY_TEXT, "vocab_size": len(tokenizer)},
        )
    torch.manual_seed(0)
    built = time.perf_counter()
    with torch.device(device):
        model = ZiyaBlip2ForCausalLM._from_config(config, dtype=dtype).eval()
    print(
        f"built {'real' if real else 'tiny'} dims on {device} in {time.perf_counter() - built:.1f} s"
    )
    processor = ZiyaImageProcessor(image_size(config))
    settings = GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    turns = tokenizer(f"<human>:{CAPTION}\n<bot>:", add_special_tokens=False).input_ids
    prompt_tokens = 1 + config.num_query_tokens + len(turns)  # bos + image + turns
    flops = _flops_per_image(model, prompt_tokens, new_tokens)
    roofline = peak * 1e12 / flops
    print(
        f"{flops / 1e9:.4g} GFLOP per image ({prompt_tokens} prompt + {new_tokens} new tokens); "
        f"roofline {roofline:.4g} images/s at {peak:.0f} TFLOP/s"
        + ("" if device.type == "cuda" else " (a GPU peak: the fraction means nothing on CPU)")
    )
    size = image_size(config)

    def caption(batch: int) -> int:
        raw = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8).to(device)
        embeds = model.encode_images(processor.normalize(raw, dtype))
        answers = model.answer_batch(tokenizer, [CAPTION] * batch, embeds, generation=settings)
        return sum(a.num_tokens for a in answers)

    for batch in batch_sizes:
        try:
            caption(batch)  # warm-up (allocator, kernels)
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            tokens = sum(caption(batch) for _ in range(repeats))
            _sync(device)
            seconds = time.perf_counter() - start
        except torch.OutOfMemoryError:
            print(f"  batch {batch:4d}: out of memory")
            torch.cuda.empty_cache()
            break
        images_s = batch * repeats / seconds
        memory = (
            f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
            if device.type == "cuda"
            else ""
        )
        print(
            f"  batch {batch:4d}: {images_s:8.1f} images/s, {tokens / seconds:9.0f} tokens/s, "
            f"{images_s / roofline:7.2%} of roofline{memory}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    dims = parser.add_mutually_exclusive_group()
    dims.add_argument("--real-dims", action="store_true", help="sweep at real dims (CUDA)")
    dims.add_argument("--tiny-dims", action="store_true", help="sweep at tiny dims (any device)")
    parser.add_argument("--rows", type=int, default=96, help="rows for the batched-vs-chat run")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64, help="max new tokens (a caption)")
    parser.add_argument("--batch-sizes", type=str, default=None, help="comma list for sweeps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=800.0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    # One thread by default: small CPU ops gain nothing from more, and OpenMP spin-waits make
    # timings erratic on a shared machine.
    torch.set_num_threads(args.threads)
    if args.real_dims or args.tiny_dims:
        default_sizes = "16,64,128,256" if args.real_dims else "4,16,32"
        sizes = [int(b) for b in (args.batch_sizes or default_sizes).split(",")]
        sweep(args.real_dims, sizes, args.repeats, args.new_tokens, args.peak_tflops)
    else:
        compare_batched_with_chat(args.rows, args.batch, args.new_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
