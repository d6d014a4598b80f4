"""Ziya-Visual (Ziya-BLIP2-14B-Visual-v1) on transformers: model, prompt, preprocessing, loading.

The model alone: this package never imports ray, pipeline or jobs.
"""

from .configuration import real_dims_config, ziya_config
from .loading import UnsafeCheckpointError, load_ziya, model_identity
from .modeling import Answer, GenerationSettings, ZiyaBlip2ForCausalLM
from .processing import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageDecodeError,
    ImageTooLarge,
    ZiyaImageProcessor,
    decode_image,
)
from .prompt import build_prompt

_LAZY = {"TinyCheckpoint", "write_tiny_checkpoint"}


def __getattr__(name: str):
    # Imported on first use so `python -m ziya_model.tiny` does not import the module twice.
    if name in _LAZY:
        from . import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module 'ziya_model' has no attribute {name!r}")


__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "Answer",
    "GenerationSettings",
    "ImageDecodeError",
    "ImageTooLarge",
    "TinyCheckpoint",
    "UnsafeCheckpointError",
    "ZiyaBlip2ForCausalLM",
    "ZiyaImageProcessor",
    "build_prompt",
    "decode_image",
    "load_ziya",
    "model_identity",
    "real_dims_config",
    "write_tiny_checkpoint",
    "ziya_config",
]
