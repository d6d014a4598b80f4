"""Decoding options: one typed definition for `chat()`, `answer_batch` and the job file.

The fields are transformers' `GenerationConfig` keys that matter for captions and labeling,
with the release's values as defaults. `chat(..., **generate_config)` also forwards any other
`GenerationConfig` key (`extra`), checked against transformers' own list so a misspelled key is
an error, and the assembled config goes through transformers' strict validation.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Keys that are the model's or this package's business, never the caller's.
_RESERVED = {
    "pad_token_id",
    "eos_token_id",
    "bos_token_id",
    "return_dict_in_generate",
    "output_scores",
    "output_logits",
    "num_return_sequences",
}


class GenerationSettings(BaseModel):
    """How answers are decoded. Greedy by default, as the public demo (it never set do_sample)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(
        default=128, ge=1, le=2048, description="Upper bound on answer tokens (the release's 128)."
    )
    min_new_tokens: int = Field(
        default=0, ge=0, description="eos is suppressed before this many tokens."
    )
    do_sample: bool = Field(
        default=False, description="Sample instead of greedy/beam decoding (the demo never did)."
    )
    temperature: float = Field(
        default=0.7, gt=0, description="Sampling temperature (do_sample only; the release's 0.7)."
    )
    top_p: float = Field(
        default=0.1, gt=0, le=1, description="Nucleus mass (do_sample only; the release's 0.1)."
    )
    top_k: int = Field(
        default=50, ge=0, description="Keep the k most likely tokens (do_sample only; 0 = all)."
    )
    num_beams: int = Field(
        default=1, ge=1, le=16, description="Beam search width; 1 = greedy (or sampling)."
    )
    length_penalty: float = Field(
        default=1.0,
        description="Beam search only: score = log-prob sum / length**length_penalty "
        "(> 1 favours longer answers).",
    )
    no_repeat_ngram_size: int = Field(
        default=0, ge=0, description="Never repeat an n-gram of this size (0 = off)."
    )
    repetition_penalty: float = Field(
        default=1.18,
        gt=0,
        description="> 1 discourages repeating tokens; 1.18 is what the release's public demo "
        "passed to every call.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> GenerationSettings:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens "
                f"({self.max_new_tokens})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for the `generation` JSON column of output rows)."""
        return self.model_dump()

    def as_json(self) -> str:
        """Canonical JSON: part of the incremental-run key, so equal settings give equal text."""
        return json.dumps(self.model_dump(), sort_keys=True)

    @classmethod
    def split(cls, options: dict[str, Any]) -> tuple[GenerationSettings, dict[str, Any]]:
        """`chat(**generate_config)`: the typed fields, and every other key as `extra`."""
        fields = {k: v for k, v in options.items() if k in cls.model_fields}
        extra = {k: v for k, v in options.items() if k not in cls.model_fields}
        try:
            settings = cls(**fields)
        except ValidationError as err:
            raise ValueError(f"invalid generation options: {err}") from None
        check_extra_keys(extra)
        return settings, extra

    def generation_config(self, tokenizer, extra: dict[str, Any] | None = None):
        """A fresh transformers `GenerationConfig`, strictly validated.

        Sampling knobs are passed only when sampling and beam knobs only with beams, so the
        release's `generate_config` (temperature and top_p without do_sample) is valid greedy.
        """
        from transformers import GenerationConfig

        extra = dict(extra or {})
        check_extra_keys(extra)
        pad = tokenizer.pad_token_id
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            # Ziya pads with id 0; fall back to eos for tokenizers without a pad token.
            "pad_token_id": int(pad if pad is not None else tokenizer.eos_token_id),
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "use_cache": True,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.num_beams > 1:
            kwargs.update(length_penalty=self.length_penalty)
        kwargs.update(extra)
        config = GenerationConfig(**kwargs)
        config.validate(strict=True)
        return config


def check_extra_keys(extra: dict[str, Any]) -> None:
    """Raise on a key transformers' GenerationConfig does not know (with the closest match)."""
    from transformers import GenerationConfig

    known = {k for k in GenerationConfig().to_dict() if not k.startswith("_")} - _RESERVED
    for key in extra:
        if key in _RESERVED:
            raise ValueError(f"generation option {key!r} is set by ziya_model, not by the caller")
        if key not in known:
            close = difflib.get_close_matches(
                key, known | set(GenerationSettings.model_fields), n=1
            )
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown generation option {key!r}{hint}")
