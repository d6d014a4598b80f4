"""transformers' repetition penalty and no-repeat-n-gram rule, as a vLLM logits processor.

Why not vLLM's own `repetition_penalty`: vLLM penalizes every token of the prompt and of the
answer. The transformers engine generates from `inputs_embeds` (the image is embeddings, not
ids), so its `generate` sees only the new tokens as `input_ids`, and its penalty (and its
no-repeat-n-gram rule) covers the answer's tokens alone, as the release's transformers 4.29 did.
With vLLM's penalty the two engines would answer differently under the release's 1.18; this
processor applies transformers' rule to the answer's tokens, so greedy answers stay equal.

Per request, through `SamplingParams.extra_args`:
    {"ziya_repetition_penalty": 1.18, "ziya_no_repeat_ngram_size": 0}
Requests without them (or with 1.0 / 0) are not touched.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

PENALTY_KEY = "ziya_repetition_penalty"
NGRAM_KEY = "ziya_no_repeat_ngram_size"
# Named by import path in EngineArgs(logits_processors=...), so vLLM's worker can import it.
QUALNAME = "ziya_model.vllm.logits:AnswerOnlyPenalties"


class AnswerOnlyPenalties(LogitsProcessor):
    """`RepetitionPenaltyLogitsProcessor` + `NoRepeatNGramLogitsProcessor` over answer tokens."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        # batch index -> (penalty, n-gram size, the request's live list of output token ids)
        self.rows: dict[int, tuple[float, int, list[int]]] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = sampling_params.extra_args or {}
        if float(extra.get(PENALTY_KEY, 1.0)) <= 0:
            raise ValueError(f"{PENALTY_KEY} must be > 0")
        if int(extra.get(NGRAM_KEY, 0)) < 0:
            raise ValueError(f"{NGRAM_KEY} must be >= 0")

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token is most likely

    @staticmethod
    def _state(params, _prompt_ids, output_ids):
        extra = params.extra_args or {}
        penalty = float(extra.get(PENALTY_KEY, 1.0))
        ngram = int(extra.get(NGRAM_KEY, 0))
        if penalty == 1.0 and ngram == 0:
            return None
        return penalty, ngram, output_ids

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, (penalty, ngram, output_ids) in self.rows.items():
            if not output_ids:
                continue
            if penalty != 1.0:
                # transformers: logit < 0 -> logit * p, else logit / p, once per distinct token.
                ids = torch.tensor(sorted(set(output_ids)), device=logits.device)
                score = logits[row, ids]
                logits[row, ids] = torch.where(score < 0, score * penalty, score / penalty)
            if ngram and len(output_ids) >= ngram:
                banned = _banned_next_tokens(output_ids, ngram)
                if banned:
                    logits[row, torch.tensor(banned, device=logits.device)] = -float("inf")
        return logits


def _banned_next_tokens(ids: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already in `ids` (transformers' rule)."""
    prefix = tuple(ids[len(ids) - n + 1 :]) if n > 1 else ()
    banned = {
        ids[i + n - 1] for i in range(len(ids) - n + 1) if tuple(ids[i : i + n - 1]) == prefix
    }
    return sorted(banned)
