"""Write a tiny random-weight Ziya-Visual checkpoint with the released on-disk layout.

    python -m ziya_model.tiny OUT_DIR [--seed 0] [--format safetensors|bin]

Writes, in a few seconds on a CPU:
    OUT_DIR/visual/  config.json (Blip2Config + human_name, assistant_name, prompt_prefix),
                     model.safetensors or pytorch_model.bin (vision, Q-Former, projection,
                     query tokens; no language-model keys), weights.sha256
    OUT_DIR/llm/     config.json (model_type: llama), model.safetensors, generation_config.json,
                     the tokenizer in Ziya-LLaMA's own files: a SentencePiece `tokenizer.model`
                     trained offline with LLaMA's settings on a small bilingual text,
                     `tokenizer_config.json` (no `legacy` key, as Ziya's), `special_tokens_map.json`
                     and `added_tokens.json` with `<human>`, `<bot>` right after the SentencePiece
                     vocabulary (unk 0, bos 1, eos 2, pad = unk like Ziya), weights.sha256
Tests and the demo load it through the same code path as the real weights. Its answers are
meaningless text. Deterministic given the seed.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .configuration import ziya_config
from .loading import write_weights_manifest
from .modeling import ZiyaBlip2ForCausalLM
from .tokenization import load_tokenizer

# Trained into the tiny tokenizer so English and Chinese questions give short token sequences.
_CORPUS = """\
A photo of a cat sitting on a sofa. Describe the image in detail.
What is in the picture? How many people are there? What color is the car?
An astronaut in a white suit stands in front of a flag. A cup of coffee on a table.
The rocket is on the launch pad. A woman holding a camera. The sky is blue and clear.
Please answer the question about the image. Is there a dog? Where was this photo taken?
这张图片里有什么？请详细描述这张图片。图中有几个人？汽车是什么颜色的？
一只猫坐在沙发上。桌子上有一杯咖啡。火箭在发射台上。宇航员站在旗子前面。
这是在哪里拍的照片？天空是蓝色的。请回答关于图片的问题。图片中有狗吗？
请用中文和英文各写一句话描述这张图片。Describe this image in one sentence.
Question: what is it? Answer: a cat. Note: 2 cups; 3 dogs (yes/no).
A gray cat with green eyes. A red and white rocket. An old film camera. 2 people, 3 cups, 10 stars.
问：这是什么？答：一只猫。一只灰色的猫。一枚红白相间的火箭。一台旧相机。一位穿宇航服的女人。
一位宇航员站在旗子前。An astronaut in front of a flag. 桌上有一杯咖啡。A cup of coffee on a table.
一只橘色的猫坐着。An orange cat sitting. 发射台上的火箭。A rocket on the launch pad.
一个拿相机的男人。A man with a camera. 许多旧硬币。Many old coins. 深空中的星系。Galaxies in space.
图片里有什么？What is the main color of this picture? White. Brown. Orange. Blue. Gray. Black.
一位宇航员。一杯咖啡。一只猫。一枚火箭。一台相机。硬币。许多星系。What did you just say?
"""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: Ziya/LLaMA's pad(=unk), bos, eos
ROLE_TOKENS = ["<human>", "<bot>"]  # added tokens, as in Ziya's added_tokens.json
TOKENIZER_VOCAB = 1000  # an upper bound: the small corpus gives fewer pieces

TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 224,  # realistic preprocessing; 257 vision tokens
    "patch_size": 14,
    "initializer_range": 0.02,  # transformers' 1e-10 default makes every image look the same
}
TINY_QFORMER = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "cross_attention_frequency": 2,
    # With 0.02 the random cross-attention is near-uniform over the 257 image tokens, so every
    # image gives the same embeddings; 0.5 keeps images apart (tests can then tell them apart).
    "initializer_range": 0.5,
}
TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    # head_dim 32: vLLM's CPU attention rejects 16 (head_dim must be 32, 64, 80, ...)
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@dataclass(frozen=True)
class TinyCheckpoint:
    """Where a tiny checkpoint was written: the visual dir and the merged-LLM dir."""

    visual_dir: Path
    llm_dir: Path


def train_sentencepiece() -> bytes:
    """A SentencePiece model trained offline on `_CORPUS` with LLaMA's settings (deterministic).

    BPE with byte fallback, identity normalization, whitespace kept as it is, a dummy prefix and
    split digits, as LLaMA's `tokenizer.model`: with SentencePiece's defaults newlines would be
    dropped and a comparison with the release's tokenization would mean nothing.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines() * 2),
        model_writer=model,
        model_type="bpe",
        vocab_size=TOKENIZER_VOCAB,
        hard_vocab_limit=False,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _added(content: str) -> dict:
    # How Ziya-LLaMA's tokenizer_config.json spells its special tokens (transformers 4.28 era).
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_tiny_tokenizer(llm_dir: str | Path) -> int:
    """Write the tokenizer files in Ziya-LLaMA's layout; returns the vocabulary size."""
    import sentencepiece as spm

    llm_dir = Path(llm_dir)
    llm_dir.mkdir(parents=True, exist_ok=True)
    proto = train_sentencepiece()
    (llm_dir / "tokenizer.model").write_bytes(proto)
    n_pieces = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    added = {tok: n_pieces + i for i, tok in enumerate(ROLE_TOKENS)}
    files = {
        "added_tokens.json": added,
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        "tokenizer_config.json": {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": _added("<s>"),
            "clean_up_tokenization_spaces": False,
            "eos_token": _added("</s>"),
            "model_max_length": 2048,
            "pad_token": None,
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": _added("<unk>"),
        },
    }
    for name, content in files.items():
        (llm_dir / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return n_pieces + len(ROLE_TOKENS)


def build_tiny_tokenizer():
    """The tiny tokenizer, loaded as the real one is (for benchmarks that need no checkpoint)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(tmp)
        return load_tokenizer(tmp, pad_token_id=0)


def write_tiny_checkpoint(
    out_dir: str | Path, seed: int = 0, weights_format: str = "safetensors"
) -> TinyCheckpoint:
    """Write a tiny random Ziya-Visual checkpoint under `out_dir` (see the module docstring)."""
    if weights_format not in ("safetensors", "bin"):
        raise ValueError(f"weights_format must be 'safetensors' or 'bin', got {weights_format!r}")
    out = Path(out_dir)
    visual_dir, llm_dir = out / "visual", out / "llm"
    visual_dir.mkdir(parents=True, exist_ok=True)
    llm_dir.mkdir(parents=True, exist_ok=True)

    vocab_size = write_tiny_tokenizer(llm_dir)
    config = ziya_config(
        vision_config=TINY_VISION,
        qformer_config=TINY_QFORMER,
        text_config={**TINY_TEXT, "vocab_size": vocab_size},
    )
    torch.manual_seed(seed)
    model = ZiyaBlip2ForCausalLM(config).eval()
    with torch.no_grad():
        # Released queries are trained, not zero; random ones make the Q-Former output richer.
        model.query_tokens.normal_(0.0, 0.5)
    return save_checkpoint(model, out, weights_format)


def save_checkpoint(
    model: ZiyaBlip2ForCausalLM, out_dir: str | Path, weights_format: str = "safetensors"
) -> TinyCheckpoint:
    """Save `model` as visual/ + llm/ (weights and manifests) beside a tokenizer already in llm/."""
    config = model.config
    visual_dir, llm_dir = Path(out_dir) / "visual", Path(out_dir) / "llm"
    visual = {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not name.startswith("language_model.")
    }
    config.save_pretrained(visual_dir)
    if weights_format == "safetensors":
        save_file(visual, str(visual_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(visual, visual_dir / "pytorch_model.bin")
    write_weights_manifest(visual_dir)

    model.language_model.save_pretrained(llm_dir)
    write_weights_manifest(llm_dir)
    return TinyCheckpoint(visual_dir=visual_dir, llm_dir=llm_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    args = parser.parse_args(argv)
    tiny = write_tiny_checkpoint(args.out_dir, seed=args.seed, weights_format=args.format)
    print(json.dumps({"visual_dir": str(tiny.visual_dir), "llm_dir": str(tiny.llm_dir)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
