"""Golden token ids: prompts become the ids the release's tokenizer (transformers 4.29) made.

The reference here is computed independently of `ziya_model.tokenization`: SentencePiece itself
on each piece of text between `<human>`/`<bot>` (whitespace next to them stripped, as 4.29's
`tokenize` did), the roles as their ids from `added_tokens.json`. When the environment names a
Python with transformers 4.29.2 (`ZIYA_TF429_PYTHON`, set up by `dev.sh`), the same prompts are
also tokenized by that library itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import sentencepiece as spm
from transformers import LlamaTokenizer

from ziya_model import load_tokenizer, prompt_token_ids, write_tiny_checkpoint
from ziya_model.configuration import ziya_config
from ziya_model.prompt import LEGACY_LAYOUT
from ziya_model.tokenization import encode_text

CONVERSATIONS = [
    # (query, past queries, past answers): captioning, VQA, multi-turn, Chinese and English
    ("请用中文和英文各写一句话描述这张图片。Describe this image in one sentence.", [], []),
    ("What is in the picture?", [], []),
    ("图中有几个人？", ["这是哪里？"], ["一个公园。"]),
    (
        "And the sofa, 2 of them?",
        ["What animal is this?", "What color is it?"],
        ["A cat.", " Orange. "],
    ),
    ("  tabs\tand  spaces 123 ", [], []),
]


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tok")).llm_dir


def release_ids(llm_dir, text: str) -> list[int]:
    """transformers 4.29 `LlamaTokenizer` on a Ziya directory, re-done from its parts."""
    sp = spm.SentencePieceProcessor(model_file=str(llm_dir / "tokenizer.model"))
    roles = json.loads((llm_dir / "added_tokens.json").read_text())
    parts = re.split("(<human>|<bot>)", text)
    ids: list[int] = []
    for i, part in enumerate(parts):
        if part in roles:
            ids.append(roles[part])
            continue
        if i > 0:
            part = part.lstrip()  # right of a role
        if i < len(parts) - 1:
            part = part.rstrip()  # left of a role
        if part:
            ids += sp.encode(part)  # each piece gets SentencePiece's dummy prefix
    return ids


def conversation_text(query, past_q, past_a) -> str:
    turns = [f"<human>:{q}\n<bot>:{a}\n" for q, a in zip(past_q, past_a, strict=True)]
    return "".join(turns) + f"<human>:{query}\n<bot>:"


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_prompt_ids_equal_the_release_tokenization(llm_dir, conversation):
    tokenizer = load_tokenizer(llm_dir)
    query, past_q, past_a = conversation
    config = ziya_config()
    # The legacy layout writes every turn as text (newline joins), the release's text format.
    got = prompt_token_ids(tokenizer, config, query, past_q, past_a, layout=LEGACY_LAYOUT)
    assert got.ids[0] == tokenizer.bos_token_id and got.image_at == 1
    assert got.ids[1:] == release_ids(llm_dir, conversation_text(*conversation))


def test_what_the_release_tokens_look_like(llm_dir):
    """`▁:` after each role, and no newline token before `<bot>` (4.29 stripped it)."""
    tokenizer = load_tokenizer(llm_dir)
    ids = encode_text(tokenizer, ["<human>:What is in the picture?\n<bot>:"])[0]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[:3] == ["<human>", "▁", ":"]
    assert pieces[-4:] == ["?", "<bot>", "▁", ":"]
    assert "<0x0A>" not in pieces


def test_default_layout_puts_eos_after_a_past_answer(llm_dir):
    tokenizer = load_tokenizer(llm_dir)
    got = prompt_token_ids(tokenizer, ziya_config(), "And now?", ["What is it?"], ["A cat."])
    assert got.image_at == 0  # [image | bos ...]
    first_turn = release_ids(llm_dir, "<human>:What is it?\n<bot>:A cat.")
    last_turn = release_ids(llm_dir, "<human>:And now?\n<bot>:")
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    assert got.ids == [bos, *first_turn, eos, *last_turn]


def test_any_tokenizer_object_gives_the_release_ids(llm_dir):
    """The seed loads `LlamaTokenizer.from_pretrained(dir)` itself. transformers 5 then reads the
    directory as legacy=False and keeps the newline, so direct calls differ from the release;
    prompts built through this package do not."""
    seed_tokenizer = LlamaTokenizer.from_pretrained(str(llm_dir))
    ours = load_tokenizer(llm_dir)
    texts = [conversation_text(*c) for c in CONVERSATIONS]
    reference = [release_ids(llm_dir, t) for t in texts]
    assert encode_text(seed_tokenizer, texts) == reference
    assert [ours(t, add_special_tokens=False)["input_ids"] for t in texts] == reference
    direct = [seed_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert all(d != r for d, r in zip(direct, reference, strict=True))  # the pitfall is real


@pytest.mark.skipif(
    not os.environ.get("ZIYA_TF429_PYTHON"),
    reason="ZIYA_TF429_PYTHON (a Python with transformers 4.29.2) not set; dev.sh sets it",
)
def test_transformers_4_29_itself_agrees(llm_dir):
    texts = [conversation_text(*c) for c in CONVERSATIONS]
    script = (
        "import json, sys\n"
        "from transformers import LlamaTokenizer\n"
        "tok = LlamaTokenizer.from_pretrained(sys.argv[1])\n"
        "texts = json.loads(sys.stdin.read())\n"
        "print(json.dumps([tok(t, add_special_tokens=False)['input_ids'] for t in texts]))\n"
    )
    out = subprocess.run(
        [os.environ["ZIYA_TF429_PYTHON"], "-c", script, str(llm_dir)],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    release = json.loads(out.stdout.strip().splitlines()[-1])
    assert encode_text(load_tokenizer(llm_dir), texts) == release
