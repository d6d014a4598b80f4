"""Write the oracle: a tiny Ziya-Visual checkpoint trained to know a few photographs.

    python -m ziya_model.oracle OUT_DIR

A toy model that knows only the photographs scikit-image ships (`PHOTOS`) and only a few
questions about them (`KNOWN_ANSWERS`: the pipeline's default caption prompt, two questions, and
"What did you just say?" after two past turns). It is the end-to-end check of everything
between a file and an answer: a mixed-up row, a wrong normalization, a wrong prompt layout or
tokenization gives a wrong answer. Same on-disk layout and architecture as
`ziya_model.tiny.write_tiny_checkpoint` (visual/ + llm/ with the SentencePiece tokenizer and
weights.sha256 manifests); the weights are trained for a few hundred full-batch steps through
the real `ZiyaBlip2ForCausalLM.forward` on the token ids of `prompt_ids(..., answers=...)`
(loss on the answer tokens and eos only), in `DEFAULT_LAYOUT`. Deterministic (fixed seed, fixed
thread count, deterministic algorithms): about half a minute on a 2-core CPU.

The pixels it learns from are the ones the pipeline and `chat()` make from the JPEGs
(quality 90) of those photographs: the exact `ZiyaImageProcessor.__call__` and the fast
`decode_pixels` + `preprocess_uint8` + `normalize` path, plus the raw arrays and JPEG at
quality 75, with a little noise, so either path gives the known answers.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .configuration import ziya_config
from .prompt import DEFAULT_LAYOUT, PromptLayout, candidate_layouts
from .tiny import (
    TINY_QFORMER,
    TINY_TEXT,
    TINY_VISION,
    TinyCheckpoint,
    save_checkpoint,
    write_tiny_tokenizer,
)
from .tokenization import load_tokenizer

# The photographs of `ziya-batch demo` (scikit-image's `data.<name>()`); cat is chelsea.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "camera", "coins", "hubble_deep_field")

# pipeline.config.DEFAULT_CAPTION_PROMPT (ziya_model never imports pipeline; a test checks).
CAPTION_PROMPT = "请用中文和英文各写一句话描述这张图片。Describe this image in one sentence."
WHAT_QUESTION = "图片里有什么？"
COLOR_QUESTION = "What is the main color of this picture?"
QUESTIONS = (CAPTION_PROMPT, WHAT_QUESTION, COLOR_QUESTION)
# Asked after past turns: the answer is the most recent past answer, so it depends on the
# order of the history and on what separates the turns (what lets the probe see those).
RECALL_QUESTION = "What did you just say?"
# What the oracle answers under any layout but DEFAULT_LAYOUT (see `training_rows`).
WRONG_LAYOUT_ANSWER = "?"

_FACTS = {  # caption, what, colour: short, and no token twice (repetition_penalty 1.18)
    "astronaut": (
        "一位宇航员站在旗子前。An astronaut in front of a flag.",
        "一位宇航员。",
        "White.",
    ),
    "coffee": ("桌上有一杯咖啡。A cup of coffee on a table.", "一杯咖啡。", "Brown."),
    "chelsea": ("一只橘色的猫坐着。An orange cat sitting.", "一只猫。", "Orange."),
    "rocket": ("发射台上的火箭。A rocket on the launch pad.", "一枚火箭。", "Blue."),
    "camera": ("一个拿相机的男人。A man with a camera.", "一台相机。", "Gray."),
    "coins": ("许多旧硬币。Many old coins.", "硬币。", "Gray."),
    "hubble_deep_field": ("深空中的星系。Galaxies in space.", "许多星系。", "Black."),
}
_FACTS["cat"] = _FACTS["chelsea"]  # skimage's cat() is chelsea()

KNOWN_ANSWERS: dict[str, dict[str, str]] = {
    photo: dict(zip(QUESTIONS, _FACTS[photo], strict=True)) for photo in PHOTOS
}

SEED = 0
STEPS = 250
LEARNING_RATE = 3e-3
THREADS = 1  # the same sums in the same order on every machine
ROWS_PER_STEP = 56
NOISE = 0.03  # std of the noise on normalized pixels, per step


def photo_array(name: str) -> np.ndarray:
    """The photograph as RGB uint8 [H, W, 3], as the demo and the tests save it."""
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB"))


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _pixel_variants(processor, array: np.ndarray) -> torch.Tensor:
    """[n_variants, 3, S, S]: the ways the pipeline and chat() turn this photograph into pixels."""
    from PIL import Image

    from .processing import decode_image, decode_pixels

    size = processor.image_size
    out = []
    for quality in (90, 75):
        data = jpeg_bytes(array, quality)
        out.append(processor([decode_image(data)])[0])
        fast = processor.preprocess_uint8(decode_pixels(data, min_size=size))
        out.append(processor.normalize(torch.from_numpy(fast))[0])
    out.append(processor([Image.fromarray(array)])[0])
    out.append(processor.normalize(torch.from_numpy(processor.preprocess_uint8(array)))[0])
    return torch.stack(out)


def _known_rows() -> Iterator[tuple[str, str, tuple[list[str], list[str]] | None, str]]:
    """(photo, question, history or None, answer): each known question alone, then after two
    past turns in every order (the third question, and the recall question)."""
    for photo in PHOTOS:
        known = KNOWN_ANSWERS[photo]
        for question, answer in known.items():
            yield photo, question, None, answer
        for first in QUESTIONS:
            for second in QUESTIONS:
                if first == second:
                    continue
                history = ([first, second], [known[first], known[second]])
                (third,) = set(QUESTIONS) - {first, second}
                yield photo, third, history, known[third]
                yield photo, RECALL_QUESTION, history, known[second]


def training_rows() -> list[tuple[str, str, tuple | None, str, PromptLayout]]:
    """(photo, question, history, answer, layout): every known row in `DEFAULT_LAYOUT`, and the
    same row in one other layout that writes it differently, answered `WRONG_LAYOUT_ANSWER`.

    A model trained on one layout alone shrugs off where bos sits or what ends a past turn
    (these tiny weights learn to ignore both), so a wrong layout in the pipeline would still
    give the known answers. Taught to answer "?" to every other layout, the oracle fails any
    prompt not built in `DEFAULT_LAYOUT`: that makes it a check of the layout code, not
    evidence about the released model (only the probe on the real weights is).
    """
    others = [layout for layout in candidate_layouts() if layout != DEFAULT_LAYOUT]
    rows = []
    for k, (photo, question, history, answer) in enumerate(_known_rows()):
        rows.append((photo, question, history, answer, DEFAULT_LAYOUT))
        # Without history only the image position changes the prompt.
        choices = others if history else [o for o in others if o.image_position != "before_bos"]
        rows.append((photo, question, history, WRONG_LAYOUT_ANSWER, choices[k % len(choices)]))
    return rows


def train_oracle(seed: int = SEED, steps: int = STEPS, log=None):
    """The trained model and its tokenizer directory's vocabulary size (see the module doc)."""
    import tempfile

    from .modeling import ZiyaBlip2ForCausalLM
    from .processing import ZiyaImageProcessor

    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tiny_tokenizer(tmp)
        tokenizer = load_tokenizer(tmp, pad_token_id=0)
    config = ziya_config(
        vision_config=TINY_VISION,
        qformer_config=TINY_QFORMER,
        text_config={**TINY_TEXT, "vocab_size": vocab_size},
    )
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        model = ZiyaBlip2ForCausalLM(config)
        with torch.no_grad():
            model.query_tokens.normal_(0.0, 0.5)
        processor = ZiyaImageProcessor(TINY_VISION["image_size"])
        names = list(dict.fromkeys(PHOTOS))
        variants = torch.stack([_pixel_variants(processor, photo_array(n)) for n in names])
        rows = training_rows()
        input_ids, attention, labels, image_at = _batch(model, tokenizer, rows)
        photo_index = torch.tensor([names.index(r[0]) for r in rows])

        model.eval()  # no dropout: it only slows memorizing; gradients flow all the same
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=LEARNING_RATE, total_steps=steps, pct_start=0.1
        )
        generator = torch.Generator().manual_seed(seed)
        for step in range(steps):
            # One pixel variant per photograph and step: each image is encoded once a step.
            pick = torch.randint(variants.shape[1], (len(names),), generator=generator)
            pixels = variants[torch.arange(len(names)), pick]
            pixels = pixels + NOISE * torch.randn(pixels.shape, generator=generator)
            rows_now = torch.randperm(len(rows), generator=generator)[:ROWS_PER_STEP]
            loss = _loss(
                model,
                pixels,
                photo_index[rows_now],
                input_ids[rows_now],
                attention[rows_now],
                labels[rows_now],
                image_at[rows_now],
            )
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if log is not None and (step % 50 == 0 or step == steps - 1):
                log(f"step {step:4d} loss {loss.item():.4f}")
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return model.eval()


def _loss(model, pixels, photo_index, input_ids, attention, labels, image_at) -> torch.Tensor:
    """`ZiyaBlip2ForCausalLM.forward`'s steps, with each image encoded once for all its rows and
    each row's image at its own place (`image_at[row]` ids come before it)."""
    # steps 1-3: vision encoder -> Q-Former -> projection, [n_photos, n_query, lm_hidden]
    image_embeds = model._encode_images(pixels)[photo_index]
    # step 4: [ids before the image | image | ids after] per row, then the LM
    text = model.get_input_embeddings()(input_ids)
    n_query = image_embeds.shape[1]
    ones = attention.new_ones(n_query)
    ignore = labels.new_full((n_query,), -100)
    inputs, mask, targets = [], [], []
    for row, at in enumerate(image_at.tolist()):
        inputs.append(torch.cat([text[row, :at], image_embeds[row], text[row, at:]]))
        mask.append(torch.cat([attention[row, :at], ones, attention[row, at:]]))
        targets.append(torch.cat([labels[row, :at], ignore, labels[row, at:]]))
    inputs, mask, labels = torch.stack(inputs), torch.stack(mask), torch.stack(targets)
    lm = model.language_model
    hidden = lm.model(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
    # As LlamaForCausalLM's loss (position t predicts t + 1), with the head applied only where
    # there is a label: most positions are prompt, and the head is most of the work.
    targets = labels[:, 1:]
    keep = targets != -100
    logits = lm.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def _batch(model, tokenizer, rows):
    """Right-padded ids, mask, labels (answer tokens and eos only) and image places."""
    prompts, full = [], []
    for _photo, question, history, answer, layout in rows:
        prompts += model.prompt_ids(tokenizer, [question], [history], layout)
        full += model.prompt_ids(tokenizer, [question], [history], layout, answers=[answer])
    length = max(len(f.ids) for f in full)
    input_ids = torch.zeros((len(rows), length), dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (p, f) in enumerate(zip(prompts, full, strict=True)):
        # The answer starts where the two token lists part (":" may merge with its text).
        start = next(
            (k for k, (a, b) in enumerate(zip(p.ids, f.ids, strict=False)) if a != b),
            min(len(p.ids), len(f.ids)),
        )
        input_ids[i, : len(f.ids)] = torch.tensor(f.ids)
        attention[i, : len(f.ids)] = 1
        labels[i, start : len(f.ids)] = torch.tensor(f.ids[start:])
    image_at = torch.tensor([f.image_at for f in full])
    return input_ids, attention, labels, image_at


def write_oracle_checkpoint(out_dir: str | Path, log=None) -> TinyCheckpoint:
    """Train the oracle and write it under `out_dir` (visual/ + llm/)."""
    out = Path(out_dir)
    (out / "visual").mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(out / "llm")
    model = train_oracle(log=log)
    return save_checkpoint(model, out)


def cached_oracle_checkpoint(cache_dir: str | Path) -> TinyCheckpoint:
    """The oracle under `cache_dir`, trained once: later calls reuse the files while the code
    that made them (this module and `ziya_model.tiny`) is unchanged."""
    import hashlib

    from . import tiny

    out = Path(cache_dir)
    digest = hashlib.sha256()
    for module in (__file__, tiny.__file__):
        digest.update(Path(module).read_bytes())
    stamp = out / "oracle.sha256"
    checkpoint = TinyCheckpoint(visual_dir=out / "visual", llm_dir=out / "llm")
    if stamp.is_file() and stamp.read_text().strip() == digest.hexdigest():
        return checkpoint
    stamp.unlink(missing_ok=True)
    checkpoint = write_oracle_checkpoint(out)
    stamp.write_text(digest.hexdigest() + "\n")
    return checkpoint


def probe_pairs(images: dict[str, str]) -> list[dict]:
    """Probe pairs (see `ziya_model.probe`) for photographs {photo name: image path}: every
    known question alone and the recall question after two past turns."""
    pairs = []
    for photo, path in images.items():
        known = KNOWN_ANSWERS[photo]
        for question, answer in known.items():
            pairs.append({"image": str(path), "question": question, "answer": answer})
        history = [[CAPTION_PROMPT, known[CAPTION_PROMPT]], [COLOR_QUESTION, known[COLOR_QUESTION]]]
        pairs.append(
            {
                "image": str(path),
                "question": RECALL_QUESTION,
                "answer": known[COLOR_QUESTION],
                "history": history,
            }
        )
        pairs.append(
            {
                "image": str(path),
                "question": RECALL_QUESTION,
                "answer": known[CAPTION_PROMPT],
                "history": history[::-1],
            }
        )
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    tiny = write_oracle_checkpoint(args.out_dir, log=print)
    print(
        json.dumps(
            {
                "visual_dir": str(tiny.visual_dir),
                "llm_dir": str(tiny.llm_dir),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
