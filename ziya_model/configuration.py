"""The Ziya-Visual configuration: a transformers `Blip2Config` plus Ziya's chat fields.

The released `config.json` is a plain BLIP-2 config (`model_type: "blip-2"`) whose top level
also carries `human_name`, `assistant_name` and `prompt_prefix`; transformers keeps unknown
top-level keys as attributes, so no config subclass is needed. Two pitfalls of transformers 5.x
are handled here once: config constructors are keyword-only, and a `text_config` without
`model_type` silently becomes an OPT config, so `model_type: "llama"` is always written.
"""

from __future__ import annotations

from typing import Any

from transformers import Blip2Config, LlamaConfig

from .prompt import PromptLayout

# Defaults of the released checkpoint (Ziya-BLIP2-14B-Visual-v1 config.json).
DEFAULT_HUMAN_NAME = "<human>"
DEFAULT_ASSISTANT_NAME = "<bot>"
DEFAULT_PROMPT_PREFIX = ""
DEFAULT_NUM_QUERY_TOKENS = 32

# Ziya-LLaMA-13B-v1 (merged) dimensions, for the real-size benchmark and documentation.
ZIYA_LLAMA_13B: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
    "vocab_size": 39424,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# EVA ViT-g/14 (transformers' Blip2VisionConfig defaults) and the released Q-Former.
ZIYA_VISION: dict[str, Any] = {
    "hidden_size": 1408,
    "intermediate_size": 6144,
    "num_hidden_layers": 39,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
}
ZIYA_QFORMER: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "cross_attention_frequency": 2,
}


def _as_dict(cfg: dict[str, Any] | Any | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, dict):
        return dict(cfg)
    return cfg.to_dict()


def ziya_config(
    *,
    vision_config: dict[str, Any] | Any | None = None,
    qformer_config: dict[str, Any] | Any | None = None,
    text_config: dict[str, Any] | Any | None = None,
    num_query_tokens: int = DEFAULT_NUM_QUERY_TOKENS,
    human_name: str = DEFAULT_HUMAN_NAME,
    assistant_name: str = DEFAULT_ASSISTANT_NAME,
    prompt_prefix: str = DEFAULT_PROMPT_PREFIX,
    prompt_layout: dict[str, str] | None = None,
    **extra: Any,
) -> Blip2Config:
    """Build a Ziya `Blip2Config` (keyword-only, like transformers 5.x constructors).

    Sub-configs may be dicts or config objects. `text_config` is forced to `model_type: llama`;
    `qformer_config.encoder_hidden_size` is wired from the vision hidden size by
    `Blip2Config.__post_init__`. `prompt_layout` (see `ziya_model.prompt.PromptLayout`) is
    written only when given: the released config has none, so the default layout applies.
    """
    if prompt_layout is not None:
        extra["prompt_layout"] = PromptLayout.from_dict(prompt_layout).to_dict()
    text = _as_dict(text_config)
    text["model_type"] = "llama"
    # Sub-config objects must be built by their own classes (dict -> OPT fallback otherwise).
    return Blip2Config(
        vision_config=_as_dict(vision_config),
        qformer_config=_as_dict(qformer_config),
        text_config=LlamaConfig(**{k: v for k, v in text.items() if k != "model_type"}),
        num_query_tokens=num_query_tokens,
        human_name=human_name,
        assistant_name=assistant_name,
        prompt_prefix=prompt_prefix,
        **extra,
    )


def real_dims_config(**overrides: Any) -> Blip2Config:
    """The released architecture's dimensions (ViT-g, Q-Former 768, Ziya-LLaMA-13B)."""
    return ziya_config(
        vision_config=dict(ZIYA_VISION),
        qformer_config=dict(ZIYA_QFORMER),
        text_config=dict(ZIYA_LLAMA_13B),
        **overrides,
    )


def human_name(config: Any) -> str:
    """The user role marker (`<human>` in the release)."""
    return getattr(config, "human_name", None) or DEFAULT_HUMAN_NAME


def assistant_name(config: Any) -> str:
    """The assistant role marker (`<bot>` in the release)."""
    return getattr(config, "assistant_name", None) or DEFAULT_ASSISTANT_NAME


def prompt_prefix(config: Any) -> str:
    """Text placed before the image embeddings ("" in the release)."""
    value = getattr(config, "prompt_prefix", None)
    return DEFAULT_PROMPT_PREFIX if value is None else str(value)


def prompt_layout(config: Any) -> PromptLayout:
    """The prompt layout: the config's `prompt_layout` mapping over the best-evidenced defaults
    (the released config has no such key; `python -m ziya_model.probe` settles it)."""
    return PromptLayout.from_dict(getattr(config, "prompt_layout", None))


def num_query_tokens(config: Any) -> int:
    """Number of learned Q-Former queries = image embeddings per image (32)."""
    return int(getattr(config, "num_query_tokens", None) or DEFAULT_NUM_QUERY_TOKENS)


def image_size(config: Any) -> int:
    """Side of the square model input, read from `vision_config.image_size` (never assumed)."""
    size = config.vision_config.image_size
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ValueError(f"only square image sizes are supported, got {size}")
        size = size[0]
    return int(size)
