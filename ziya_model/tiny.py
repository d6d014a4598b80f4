"""Write a tiny random-weight Ziya-Visual checkpoint with the released on-disk layout.

    python -m ziya_model.tiny OUT_DIR [--seed 0] [--format safetensors|bin]

Writes, in a few seconds on a CPU:
    OUT_DIR/visual/  config.json (Blip2Config + human_name, assistant_name, prompt_prefix),
                     model.safetensors or pytorch_model.bin (vision, Q-Former, projection,
                     query tokens; no language-model keys), weights.sha256
    OUT_DIR/llm/     config.json (model_type: llama), model.safetensors, generation_config.json,
                     a byte-level BPE tokenizer trained offline on a small bilingual text with
                     `<human>` and `<bot>` as added tokens (pad 0, bos 1, eos 2 like Ziya),
                     weights.sha256
Tests and the demo load it through the same code path as the real weights. Its answers are
meaningless text. Deterministic given the seed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .configuration import ziya_config
from .loading import write_weights_manifest
from .modeling import ZiyaBlip2ForCausalLM

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
"""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: Ziya/LLaMA's pad(=unk), bos, eos
ROLE_TOKENS = ["<human>", "<bot>"]  # added tokens, as in Ziya's added_tokens.json
TOKENIZER_VOCAB = 512

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
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
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


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on `_CORPUS` (no download, deterministic)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    # LLaMA-style: bos before every sequence when add_special_tokens=True, never eos.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        padding_side="left",
    )
    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in ROLE_TOKENS])
    ids = [fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == [0, 1, 2], f"expected <unk>, <s>, </s> at ids 0, 1, 2, got {ids}"
    return fast


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

    tokenizer = build_tiny_tokenizer()
    config = ziya_config(
        vision_config=TINY_VISION,
        qformer_config=TINY_QFORMER,
        text_config={**TINY_TEXT, "vocab_size": len(tokenizer)},
    )
    torch.manual_seed(seed)
    model = ZiyaBlip2ForCausalLM(config).eval()
    with torch.no_grad():
        # Released queries are trained, not zero; random ones make the Q-Former output richer.
        model.query_tokens.normal_(0.0, 0.5)

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
    tokenizer.save_pretrained(llm_dir)
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
