"""Prompt text to token ids exactly as the release's tokenizer made them.

The release loaded `LlamaTokenizer` (SentencePiece) under transformers 4.29. Its `tokenize`
split the text on added tokens (`<human>`, `<bot>`, and `<s>`, `</s>`, `<unk>`), stripped the
whitespace on both sides of each one (4.29 strips by default around added tokens that are not
`AddedToken`s with their own flags, which is how Ziya's `added_tokens.json` declares the
roles), and ran `sp_model.encode` on each remaining piece, so every piece got SentencePiece's
dummy prefix. For `<human>:{q}\\n<bot>:` that gives

    <human> ▁ : {q...} <bot> ▁ :

— `▁:` after each role, and no newline token before `<bot>` (the `\\n` is stripped). Checked
with transformers 4.29.2 itself on a Ziya-style tokenizer directory (2026-12-01).
transformers 5 reads Ziya's `tokenizer_config.json` as `legacy=False` (plain `:` after a role)
and never strips around `<human>`/`<bot>` (the `\\n` stays, even with `legacy=True`).

Two guards make the release's ids the only ids this package produces:
- `encode_text` applies the 4.29 rule itself (split, strip, SentencePiece on each piece alone),
  so prompts are right whatever tokenizer object the caller hands in: the seed's own
  `LlamaTokenizer.from_pretrained(...)` included.
- `load_tokenizer` loads with `legacy=True` and re-declares the role tokens as stripping on both
  sides, so `tokenizer(text)` called directly agrees too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .prompt import BOS, EOS, IMAGE, Marker, PromptLayout, Segment, build_prompt


@dataclass(frozen=True)
class PromptIds:
    """One row's prompt as token ids; the image embeddings go before `ids[image_at]`."""

    ids: list[int]  # bos and every text/eos token, no image positions
    image_at: int  # number of ids that come before the image


def load_tokenizer(llm_dir: str | Path, pad_token_id: int | None = None):
    """The merged LLM's tokenizer, set up to reproduce the release's tokenization.

    Left padding; pad id from the LLM config when the tokenizer has none (Ziya: 0).
    """
    from transformers import AddedToken, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(llm_dir), local_files_only=True, padding_side="left", legacy=True
    )
    tokenizer.padding_side = "left"
    roles = [
        AddedToken(tok.content, lstrip=True, rstrip=True, normalized=False, special=False)
        for tok in tokenizer.added_tokens_decoder.values()
        if not tok.special
    ]
    if roles:
        tokenizer.add_tokens(roles)  # same ids; only the strip flags change
    if tokenizer.pad_token_id is None and pad_token_id is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_token_id)
    return tokenizer


def _added_token_pattern(tokenizer) -> re.Pattern[str] | None:
    tokens = sorted(tokenizer.added_tokens_encoder, key=len, reverse=True)
    if not tokens:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")")


def split_release(tokenizer, text: str) -> list[str | int]:
    """transformers 4.29's `tokenize` split: added tokens become their ids, the text around each
    loses its whitespace on that side, and empty pieces are dropped."""
    pattern = _added_token_pattern(tokenizer)
    parts = pattern.split(text) if pattern else [text]
    # re.split with one group alternates text, token, text, ...
    added = tokenizer.added_tokens_encoder
    for i in range(1, len(parts), 2):
        parts[i - 1] = parts[i - 1].rstrip()
        parts[i + 1] = parts[i + 1].lstrip()
    return [added[p] if i % 2 else p for i, p in enumerate(parts) if i % 2 or p]


def encode_text(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text under the release's rule (no bos/eos added).

    Every text piece of every text goes through the tokenizer in one call.
    """
    splits = [split_release(tokenizer, t) for t in texts]
    pieces = [p for split in splits for p in split if isinstance(p, str)]
    encoded = iter(tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else [])
    out = []
    for split in splits:
        ids: list[int] = []
        for p in split:
            ids.extend([p] if isinstance(p, int) else next(encoded))
        out.append(ids)
    return out


def segments_to_ids(tokenizer, prompts: Sequence[Sequence[Segment]]) -> list[PromptIds]:
    """Token ids of each prompt's segments; exactly one IMAGE marker per prompt."""
    texts = [s for segments in prompts for s in segments if isinstance(s, str)]
    encoded = iter(encode_text(tokenizer, texts))
    special = {BOS: tokenizer.bos_token_id, EOS: tokenizer.eos_token_id}
    out = []
    for segments in prompts:
        ids: list[int] = []
        image_at = None
        for seg in segments:
            if seg is IMAGE:
                if image_at is not None:
                    raise ValueError("a prompt takes one image")
                image_at = len(ids)
            elif isinstance(seg, Marker):
                if special[seg] is not None:  # a tokenizer without bos gets none
                    ids.append(int(special[seg]))
            else:
                ids.extend(next(encoded))
        if image_at is None:
            raise ValueError("a prompt needs an IMAGE segment")
        out.append(PromptIds(ids=ids, image_at=image_at))
    return out


def prompt_token_ids(
    tokenizer,
    config: Any,
    query: str,
    history_queries: Sequence[str] = (),
    history_answers: Sequence[str] = (),
    layout: PromptLayout | None = None,
) -> PromptIds:
    """One row's prompt ids: `build_prompt` with the config's roles and layout, then tokenized.

    The one place the layout meets the tokenizer: the transformers path (`answer_batch`) and the
    vLLM plugin both take their ids from here.
    """
    from . import configuration as zc

    segments = build_prompt(
        query,
        history_queries,
        history_answers,
        human_name=zc.human_name(config),
        assistant_name=zc.assistant_name(config),
        prompt_prefix=zc.prompt_prefix(config),
        layout=layout or zc.prompt_layout(config),
    )
    return segments_to_ids(tokenizer, [segments])[0]
