"""Settle the prompt layout with real weights: score every candidate layout on known answers.

    python -m ziya_model.probe --visual VISUAL_DIR --llm MERGED_LLM_DIR --pairs pairs.jsonl \\
        [--dtype auto] [--device auto] [--max-new-tokens 64]
    python -m ziya_model.probe --oracle [--pairs pairs.jsonl]   # on a freshly trained oracle

`pairs.jsonl` holds one object a line: {"image": path, "question": ..., "answer": reference,
"history": [[past question, past answer], ...] (optional, oldest first)}. Write references the
model itself would give (for example its answers under any layout, corrected by hand); include
a few two-turn rows, or history order and the separator after an answer cannot show.

For every layout of `ziya_model.prompt.candidate_layouts()` the table gives the mean
log-likelihood per token of the reference answers (teacher-forced, `score_answers`), how many
greedy answers equal their reference exactly, and one generated answer; then the winner (the
highest mean log-likelihood: the layout the model was trained with explains its own answers
best) and its margin over the runner-up. With the released weights on one GPU (bf16) a dozen
pairs take a few minutes, loading included. Set the winner as the visual config's
`prompt_layout` if it is not the default.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .generation import GenerationSettings
from .prompt import PromptLayout, candidate_layouts


@dataclass(frozen=True)
class Pair:
    """One image, a question (with earlier turns), and the answer the model should give."""

    image: str
    question: str
    answer: str
    history: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LayoutScore:
    layout: PromptLayout
    mean_loglik: float  # mean over pairs of the mean log-likelihood per answer token
    exact: int  # generated answers equal to their reference
    total: int
    sample: str  # the first pair's generated answer


def read_pairs(path: str | Path) -> list[Pair]:
    """Pairs from a JSON-lines file (see the module docstring); blank lines are skipped."""
    pairs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            history = tuple((str(q), str(a)) for q, a in row.get("history") or ())
            pairs.append(Pair(str(row["image"]), str(row["question"]), str(row["answer"]), history))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a pair ({err!r}): {line[:200]}") from None
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def probe_layouts(
    model,
    tokenizer,
    processor,
    pairs: Sequence[Pair],
    layouts: Sequence[PromptLayout] | None = None,
    generation: GenerationSettings | None = None,
    batch_size: int = 8,
) -> list[LayoutScore]:
    """Score each layout (default: every candidate) on the pairs, best first."""
    from .processing import decode_image

    images = list(dict.fromkeys(p.image for p in pairs))
    pixels = processor([decode_image(Path(i).read_bytes()) for i in images])
    image_embeds = model.encode_images(pixels)
    index = [images.index(p.image) for p in pairs]
    histories = [([q for q, _ in p.history], [a for _, a in p.history]) for p in pairs]
    queries = [p.question for p in pairs]
    references = [p.answer for p in pairs]
    generation = generation or GenerationSettings(max_new_tokens=64)

    scores = []
    for layout in layouts or list(candidate_layouts()):
        logliks, answers = [], []
        for lo in range(0, len(pairs), batch_size):
            part = slice(lo, lo + batch_size)
            rows = index[part]
            # Each batch gets its images re-indexed so only they travel to the model.
            used = sorted(set(rows))
            embeds = image_embeds[used]
            local = [used.index(i) for i in rows]
            logliks += model.score_answers(
                tokenizer, queries[part], references[part], embeds, local, histories[part], layout
            )
            answers += model.answer_batch(
                tokenizer,
                queries[part],
                embeds,
                local,
                histories[part],
                generation=generation,
                layout=layout,
            )
        texts = [a.text for a in answers]
        scores.append(
            LayoutScore(
                layout=layout,
                mean_loglik=sum(logliks) / len(logliks),
                exact=sum(t == r for t, r in zip(texts, references, strict=True)),
                total=len(pairs),
                sample=texts[0],
            )
        )
    return sorted(scores, key=lambda s: s.mean_loglik, reverse=True)


def format_table(scores: Sequence[LayoutScore]) -> str:
    """The table, the winner and its margin over the runner-up (in mean log-likelihood)."""
    width = max(len(s.layout.name) for s in scores)
    lines = [f"{'layout':<{width}}  mean loglik  exact  sample answer"]
    for s in scores:
        sample = s.sample if len(s.sample) <= 60 else s.sample[:57] + "..."
        lines.append(
            f"{s.layout.name:<{width}}  {s.mean_loglik:11.3f}  {s.exact:>2}/{s.total:<2}  {sample!r}"
        )
    best = scores[0]
    if len(scores) > 1:
        margin = best.mean_loglik - scores[1].mean_loglik
        lines.append(
            f"winner: {best.layout.name} (margin {margin:.3f} nats/token over "
            f"{scores[1].layout.name})"
        )
    else:
        lines.append(f"winner: {best.layout.name}")
    return "\n".join(lines)


def _oracle_pairs(directory: Path) -> list[Pair]:
    from .oracle import jpeg_bytes, photo_array, probe_pairs

    paths = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins"):
        path = directory / f"{name}.jpg"
        path.write_bytes(jpeg_bytes(photo_array(name)))
        paths[name] = path
    return [
        Pair(p["image"], p["question"], p["answer"], tuple(map(tuple, p.get("history", ()))))
        for p in probe_pairs(paths)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ziya_model.probe", description=__doc__.split("\n\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--visual", type=Path, help="visual checkpoint dir")
    source.add_argument("--oracle", action="store_true", help="train and probe the oracle")
    parser.add_argument("--llm", type=Path, help="merged Ziya-LLaMA-13B dir (with --visual)")
    parser.add_argument("--pairs", type=Path, help="JSON lines of image/question/answer pairs")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    if args.visual is not None and (args.llm is None or args.pairs is None):
        parser.error("--visual needs --llm and --pairs")

    from .loading import load_ziya

    with tempfile.TemporaryDirectory() as tmp:
        if args.oracle:
            from .oracle import write_oracle_checkpoint

            print("training the oracle (a toy model that knows a few photographs)...", flush=True)
            tiny = write_oracle_checkpoint(Path(tmp) / "oracle")
            visual, llm = tiny.visual_dir, tiny.llm_dir
            pairs = read_pairs(args.pairs) if args.pairs else _oracle_pairs(Path(tmp))
        else:
            visual, llm = args.visual, args.llm
            pairs = read_pairs(args.pairs)
        model, tokenizer, processor = load_ziya(visual, llm, args.dtype, args.device)
        with torch.inference_mode():
            scores = probe_layouts(
                model,
                tokenizer,
                processor,
                pairs,
                generation=GenerationSettings(max_new_tokens=args.max_new_tokens),
                batch_size=args.batch_size,
            )
    print(f"{len(pairs)} pairs, {len(scores)} layouts")
    print(format_table(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
