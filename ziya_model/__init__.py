"""Ziya-Visual (Ziya-BLIP2-14B-Visual-v1) on transformers: model, prompt, preprocessing, loading.

The model alone: this package never imports ray, pipeline or jobs.

Names are imported from their modules on first use: a preprocessing worker that needs only
`ziya_model.processing` (torch + Pillow) does not pay for importing transformers (~3 s a worker).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "real_dims_config": "configuration",
    "ziya_config": "configuration",
    "UnsafeCheckpointError": "loading",
    "load_ziya": "loading",
    "model_identity": "loading",
    "load_tokenizer": "tokenization",
    "prompt_token_ids": "tokenization",
    "Answer": "modeling",
    "GenerationSettings": "generation",
    "ZiyaBlip2ForCausalLM": "modeling",
    "ZiyaBLIP2ForConditionalGeneration": "modeling",
    "OPENAI_CLIP_MEAN": "processing",
    "OPENAI_CLIP_STD": "processing",
    "ImageDecodeError": "processing",
    "ImageTooLarge": "processing",
    "ZiyaImageProcessor": "processing",
    "decode_image": "processing",
    "decode_pixels": "processing",
    "build_prompt": "prompt",
    "PromptLayout": "prompt",
    "TinyCheckpoint": "tiny",
    "write_tiny_checkpoint": "tiny",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ziya_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
