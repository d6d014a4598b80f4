"""`ziya-chat`: an interactive terminal chat about one image (the seed's demo, in a terminal).

    ziya-chat --visual VISUAL_DIR --llm MERGED_LLM_DIR [--dtype auto] [--device auto]
    ziya-chat --tiny      # tiny random-weight model written to a temp dir (meaningless answers)
    ziya-chat ... --engine vllm   # answers from ZiyaVLLMEngine (needs vLLM installed)

First asks for an image path, then for questions. History is kept while the image stays the
same; `/image PATH` switches images and clears history; `/reset` clears history; `/quit` (or
end of input) exits. Greedy decoding unless `--do-sample`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TextIO

import torch

from .generation import GenerationSettings
from .loading import load_ziya
from .processing import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLarge, decode_image
from .tiny import write_tiny_checkpoint

HELP = "commands: /image PATH (new image, clears history), /reset, /quit"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ziya-chat", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--visual", type=Path, help="visual checkpoint dir (config.json + weights)")
    source.add_argument("--tiny", action="store_true", help="use a tiny random-weight checkpoint")
    parser.add_argument("--llm", type=Path, help="merged Ziya-LLaMA-13B dir (with --visual)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    parser.add_argument(
        "--engine",
        default="transformers",
        choices=["transformers", "vllm"],
        help="transformers (the reference) or vllm (ziya_model.vllm; pip install "
        "'ziya-batch[vllm]'); vllm picks its device itself and has no beam search",
    )
    # Defaults are GenerationSettings' (the release's), shared with chat() and job files.
    defaults = GenerationSettings()
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    parser.add_argument("--num-beams", type=int, default=defaults.num_beams)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    args = parser.parse_args(argv)
    if args.visual is not None and args.llm is None:
        parser.error("--visual needs --llm (the merged Ziya-LLaMA-13B directory)")
    if args.engine == "vllm":
        from . import vllm

        if not vllm.installed():
            parser.error(f"--engine vllm: {vllm.NOT_INSTALLED}")
        if args.num_beams > 1:
            parser.error("--engine vllm has no beam search: use --num-beams 1")
    return args


class _Session:
    """One image and its conversation so far."""

    def __init__(self, model, tokenizer, processor, args: argparse.Namespace, out: TextIO):
        # `model` is a ZiyaBlip2ForCausalLM, or a ZiyaVLLMEngine with --engine vllm.
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.args, self.out = args, out
        self.pixels: torch.Tensor | None = None
        self.queries: list[str] = []
        self.answers: list[str] = []

    def set_image(self, path: str) -> bool:
        try:
            image = decode_image(Path(path).expanduser().read_bytes(), DEFAULT_MAX_PIXELS)
        except (OSError, ImageDecodeError, ImageTooLarge) as err:
            print(f"cannot use {path!r}: {err}", file=self.out)
            return False
        self.pixels = self.processor([image])
        self.queries, self.answers = [], []
        print(f"image {path} ({image.width}x{image.height}); ask away. {HELP}", file=self.out)
        return True

    def ask(self, query: str) -> str:
        assert self.pixels is not None, "set_image first"
        if self.args.engine == "vllm":
            answer = self._ask_vllm(query)
            self.queries.append(query)
            self.answers.append(answer)
            return answer
        answer = self.model.chat(
            tokenizer=self.tokenizer,
            pixel_values=self.pixels,
            query=query,
            previous_querys=self.queries,
            previous_outputs=self.answers,
            max_new_tokens=self.args.max_new_tokens,
            top_p=self.args.top_p,
            temperature=self.args.temperature,
            top_k=self.args.top_k,
            num_beams=self.args.num_beams,
            repetition_penalty=self.args.repetition_penalty,
            do_sample=self.args.do_sample,
        )
        self.queries.append(query)
        self.answers.append(answer)
        return answer

    def _ask_vllm(self, query: str) -> str:
        from .vllm.engine import Request

        a = self.args
        settings = GenerationSettings(
            max_new_tokens=a.max_new_tokens,
            repetition_penalty=a.repetition_penalty,
            num_beams=a.num_beams,
            do_sample=a.do_sample,
            temperature=a.temperature,
            top_p=a.top_p,
            top_k=a.top_k,
        )
        image = self.pixels[0].numpy()  # exact mode: normalized float32 [3, S, S]
        got = self.model.answer([Request(image, query, self.queries, self.answers)], settings)[0]
        if isinstance(got, Exception):
            raise got
        return got.text


def load_vllm(visual: Path, llm: Path, dtype: str = "auto"):
    """(engine, tokenizer, processor) for --engine vllm; CPU settings when torch sees no GPU."""
    from .processing import ZiyaImageProcessor
    from .vllm.engine import EngineOptions, ZiyaVLLMEngine

    gpu = torch.cuda.is_available()
    dtype = dtype if dtype != "auto" else ("bf16" if gpu else "fp32")
    cpu = {} if gpu else {"enforce_eager": True, "block_size": 32, "cpu_kvcache_gib": 1}
    # In-process engine core: ~2 s to start instead of ~24 s, and one session needs no more.
    options = EngineOptions(dtype=dtype, max_num_seqs=4, multiprocessing=False, **cpu)
    engine = ZiyaVLLMEngine(visual, llm, options)
    return engine, engine.tokenizer, ZiyaImageProcessor(int(engine.config.vision_config.image_size))


def _read(prompt: str, stdin: TextIO, out: TextIO) -> str | None:
    out.write(prompt)
    out.flush()
    line = stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


def run(session: _Session, stdin: TextIO, out: TextIO) -> int:
    """The read-answer loop; returns when input ends or on /quit."""
    while session.pixels is None:
        path = _read("image path> ", stdin, out)
        if path is None or path.strip() == "/quit":
            return 0
        if path.strip():
            session.set_image(path.strip().removeprefix("/image").strip())
    while True:
        line = _read("you> ", stdin, out)
        if line is None or line.strip() == "/quit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/image"):
            session.set_image(text.removeprefix("/image").strip())
        elif text == "/reset":
            session.queries, session.answers = [], []
            print("history cleared", file=out)
        elif text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {HELP}", file=out)
        else:
            print(f"bot> {session.ask(text)}", file=out)


def main(
    argv: list[str] | None = None, stdin: TextIO | None = None, out: TextIO | None = None
) -> int:
    args = _parse(argv)
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    with tempfile.TemporaryDirectory(prefix="ziya-tiny-") as tmp:
        if args.tiny:
            tiny = write_tiny_checkpoint(tmp)
            visual, llm = tiny.visual_dir, tiny.llm_dir
            print("tiny random-weight model: answers are meaningless text", file=out)
        else:
            visual, llm = args.visual, args.llm
        if args.engine == "vllm":
            model, tokenizer, processor = load_vllm(Path(visual), Path(llm), args.dtype)
        else:
            model, tokenizer, processor = load_ziya(
                visual, llm, dtype=args.dtype, device=args.device
            )
        try:
            return run(_Session(model, tokenizer, processor, args, out), stdin, out)
        finally:
            if args.engine == "vllm":
                model.close()


if __name__ == "__main__":
    raise SystemExit(main())
