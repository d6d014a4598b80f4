"""Both engines side by side on one machine: 64-token captions, then 4-question rows.

    bash bench/gpu_check.sh                 # one GPU: random bf16 weights of the real dimensions
    bash bench/gpu_check.sh --cpu           # CPU: the tiny checkpoint, fp32 (labelled CPU)

Run in the environment that has vLLM (`pip install 'ziya-batch[vllm]'` on a GPU machine,
`.venv-vllm` on CPU). Per engine it prints images/s, output tokens/s, the fraction of the
decode roofline (GPU: tokens/s over the decode bound of ziya_model/roofline.py, the one table
of GPUs, with the engine's sequences per step: the transformers batch, vLLM's max_num_seqs), the
prefix-cache hit rate on 4-question rows, and peak GPU memory. Every answer has exactly `--new-tokens` tokens (min = max), so the engines do the same
work. On GPU no weight file is written: the transformers model is initialized randomly on the
device, vLLM loads with `load_format="dummy"`; both read the same configs.

Targets (issue 14, one H100/H200): vLLM >= 3x transformers and >= 120 images/s.
NOT YET RUN ON A GPU: no GPU was available where this was written; only `--cpu` was run.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ziya_model.roofline import GPUS, decode_bound, gpu_type_of, llama_params  # noqa: E402

QUESTIONS = ["Describe the image.", "What is in the picture?", "这是什么？", "What color is it?"]


def _gpu_name() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return gpu_type_of(name) or name


def _dirs(cpu: bool, root: Path) -> tuple[Path, Path]:
    """(visual dir, llm dir): the tiny checkpoint, or real-dimension configs without weights."""
    from ziya_model import write_tiny_checkpoint

    tiny = write_tiny_checkpoint(root / "tiny")
    if cpu:
        return tiny.visual_dir, tiny.llm_dir
    from ziya_model.configuration import real_dims_config

    visual, llm = root / "real" / "visual", root / "real" / "llm"
    visual.mkdir(parents=True)
    llm.mkdir(parents=True)
    config = real_dims_config()
    config.save_pretrained(visual)
    config.text_config.save_pretrained(llm)
    for f in tiny.llm_dir.iterdir():  # the tiny tokenizer: ids < 39424 are all the LLM needs
        if f.name.startswith(("tokenizer", "special_tokens", "added_tokens")):
            (llm / f.name).write_bytes(f.read_bytes())
    return visual, llm


def _images(n: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (3, size, size), dtype=np.uint8) for _ in range(n)]


def _transformers(visual, llm, cpu, images, settings, batch) -> dict:
    import torch

    from ziya_model import load_ziya
    from ziya_model.configuration import real_dims_config
    from ziya_model.modeling import ZiyaBlip2ForCausalLM
    from ziya_model.processing import ZiyaImageProcessor
    from ziya_model.tokenization import load_tokenizer

    if cpu:
        model, tokenizer, processor = load_ziya(visual, llm)
    else:
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = ZiyaBlip2ForCausalLM(real_dims_config()).eval()
        torch.set_default_dtype(torch.float32)
        tokenizer, processor = load_tokenizer(llm, 0), ZiyaImageProcessor(224)
    device = next(model.parameters()).device
    dtype = model.vision_model.dtype
    prompt = QUESTIONS[0]
    # Warm-up (kernels, allocator), not timed.
    px = processor.normalize(torch.from_numpy(np.stack(images[:2])).to(device), dtype)
    model.answer_batch(tokenizer, [prompt] * 2, model.encode_images(px), generation=settings)
    if not cpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, tokens = time.perf_counter(), 0
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        px = processor.normalize(torch.from_numpy(np.stack(chunk)).to(device), dtype)
        answers = model.answer_batch(
            tokenizer, [prompt] * len(chunk), model.encode_images(px), generation=settings
        )
        tokens += sum(a.num_tokens for a in answers)
    if not cpu:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if not cpu else None
    del model
    gc.collect()
    if not cpu:
        torch.cuda.empty_cache()
    return {"wall_s": wall, "tokens": tokens, "peak_gib": peak, "prefix_cache_hit_rate": None}


def _vllm(visual, llm, cpu, images, settings) -> dict:
    import torch

    from ziya_model.vllm.engine import EngineOptions, Request, ZiyaVLLMEngine

    options = (
        EngineOptions(
            dtype="fp32",
            max_model_len=512,
            enforce_eager=True,
            block_size=32,
            cpu_kvcache_gib=2,
            multiprocessing=False,
        )
        if cpu
        else EngineOptions(dtype="bf16", max_model_len=512, load_format="dummy")
    )
    t_start = time.perf_counter()
    engine = ZiyaVLLMEngine(visual, llm, options)
    start_s = time.perf_counter() - t_start
    prompt = QUESTIONS[0]
    engine.answer([Request(images[0], prompt)], settings)  # warm-up
    before = engine.stats()
    t0 = time.perf_counter()
    answers = engine.answer([Request(im, prompt) for im in images], settings)
    wall = time.perf_counter() - t0
    tokens = sum(a.num_tokens for a in answers)
    busy = engine.stats().busy_s - before.busy_s
    # Prefix cache on 4-question rows: fresh images (mirrored), four questions each.
    rows = [np.ascontiguousarray(im[:, :, ::-1]) for im in images[: max(4, len(images) // 8)]]
    before = engine.stats()
    engine.answer([Request(im, q) for im in rows for q in QUESTIONS], settings)
    after = engine.stats()
    hit = (after.cached_prompt_tokens - before.cached_prompt_tokens) / max(
        after.prompt_tokens - before.prompt_tokens, 1
    )
    peak = None
    if not cpu:
        free, total = torch.cuda.mem_get_info()
        peak = (total - free) / 2**30  # vLLM reserves its KV cache up front
    engine.close()
    return {
        "wall_s": wall,
        "tokens": tokens,
        "peak_gib": peak,
        "prefix_cache_hit_rate": hit,
        "engine_start_s": start_s,
        "busy_fraction": busy / wall,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny checkpoint on CPU (fp32)")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=None, help="transformers batch size")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    cpu = args.cpu
    gpu = None if cpu else _gpu_name()
    if not cpu and gpu is None:
        parser.error("no CUDA GPU visible: run with --cpu for the CPU check")
    n = args.images or (16 if cpu else 512)
    batch = args.batch or (8 if cpu else 128)

    from ziya_model.generation import GenerationSettings

    settings = GenerationSettings(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, repetition_penalty=1.0
    )
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        visual, llm = _dirs(cpu, Path(tmp))
        images = _images(n, 224)
        results = {
            "transformers": _transformers(visual, llm, cpu, images, settings, batch),
            "vllm": _vllm(visual, llm, cpu, images, settings),
        }
    from ziya_model.configuration import real_dims_config

    llm_params = llama_params(real_dims_config().text_config.to_dict())  # Ziya-LLaMA-13B
    known = gpu in GPUS and not cpu
    seqs = {"transformers": batch, "vllm": 256}  # EngineOptions.max_num_seqs
    label = "CPU (tiny checkpoint, fp32)" if cpu else f"GPU {gpu} (real dims, random bf16)"
    print(f"gpu_check on {label}: {n} images, {args.new_tokens}-token captions")
    print(f"{'':28}{'transformers':>16}{'vllm':>16}")
    rows = {}
    for name, r in results.items():
        r["images_per_s"] = n / r["wall_s"]
        r["tokens_per_s"] = r["tokens"] / r["wall_s"]
        r["roofline_fraction"] = (
            r["tokens_per_s"] / decode_bound(gpu, llm_params, 2, seqs[name]) if known else None
        )
        rows[name] = r

    def line(label, key, fmt):
        cells = [
            ("n/a" if rows[e].get(key) is None else fmt.format(rows[e][key]))
            for e in ("transformers", "vllm")
        ]
        print(f"{label:28}{cells[0]:>16}{cells[1]:>16}")

    line("images/s", "images_per_s", "{:.2f}")
    line("output tokens/s", "tokens_per_s", "{:.1f}")
    line("decode roofline fraction", "roofline_fraction", "{:.3f}")
    line("prefix-cache hit (4 q/img)", "prefix_cache_hit_rate", "{:.3f}")
    line("peak GPU memory GiB", "peak_gib", "{:.1f}")
    line("engine busy fraction", "busy_fraction", "{:.3f}")
    ratio = rows["vllm"]["images_per_s"] / rows["transformers"]["images_per_s"]
    print(
        f"vllm / transformers: {ratio:.2f}x images/s; engine start {rows['vllm']['engine_start_s']:.1f} s; total {time.perf_counter() - t_all:.0f} s"
    )
    if not cpu:
        print(
            f"targets: ratio >= 3 ({'met' if ratio >= 3 else 'NOT met'}), vllm >= 120 images/s "
            f"({'met' if rows['vllm']['images_per_s'] >= 120 else 'NOT met'})"
        )
    if args.json:
        args.json.write_text(json.dumps({"label": label, "ratio": ratio, **rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
