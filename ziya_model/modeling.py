"""`ZiyaBlip2ForCausalLM`: Ziya-Visual rebuilt from transformers' own BLIP-2 and LLaMA parts.

The model is a `Blip2PreTrainedModel` (a plain `PreTrainedModel` fails transformers' SDPA
checks) holding exactly the released attributes, so the released `pytorch_model.bin` /
`model.safetensors` keys load strictly:

    vision_model         Blip2VisionModel (EVA ViT-g/14)
    query_tokens         [1, num_query_tokens, qformer_hidden] learned queries
    qformer              Blip2QFormerModel (kept in fp32, as transformers does for BLIP-2)
    language_projection  Linear(qformer_hidden -> lm_hidden)
    language_model       LlamaForCausalLM, passed in from outside (merged Ziya-LLaMA-13B)

transformers 5.x's `Blip2ForConditionalGeneration` only scatters image features into
`image_token_index` placeholders; Ziya has none, so this class places the image embeddings
itself, where the prompt layout puts them (`ziya_model.prompt`: by default
`[left pads | image | bos prefix turns]`), with the release's token ids
(`ziya_model.tokenization`), and calls `language_model.generate(inputs_embeds=...,
attention_mask=...)`, which returns new tokens only.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    Blip2Config,
    Blip2PreTrainedModel,
    Blip2QFormerModel,
    Blip2VisionModel,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
)
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import configuration as zc
from .generation import GenerationSettings
from .prompt import EOS, PromptLayout, build_prompt
from .tokenization import PromptIds, segments_to_ids

History = tuple[Sequence[str], Sequence[str]]


@dataclass(frozen=True)
class Answer:
    """One generated answer.

    text: new tokens only, special tokens skipped, stripped. num_tokens: generated tokens up to
    and including eos (pads excluded). mean_logprob: the mean log-probability of those tokens
    under the distribution the decoder chose from (after repetition penalty; for beam search
    the beam's own score turned back into a mean). A model-relative signal for finding doubtful
    answers among many, not a calibrated probability.
    """

    text: str
    num_tokens: int
    mean_logprob: float | None = None


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    # Ziya pads with id 0; fall back to eos for tokenizers without a pad token.
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


class _RepetitionPenalty(LogitsProcessor):
    """transformers' repetition penalty over the generated tokens, the same for every row.

    With `inputs_embeds`, `generate` sees only the new tokens as `input_ids`, and transformers
    5.x's own processor also skips each row's left-padding length of them
    (`prompt_ignore_length`), so a padded row was penalized later than the same row alone and
    batched answers differed from `chat()`. The release generated from `inputs_embeds` as well:
    the penalty covers the answer's tokens, never the prompt.
    """

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] == 0:
            return scores
        seen = scores.gather(1, input_ids)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return scores.scatter(1, input_ids, seen)


class _ChosenLogprobs(LogitsProcessor):
    """Records, step by step, the log-probability of the token each row chose.

    Called last among the logits processors, so it sees the distribution the decoder draws
    from. It keeps one step's log-softmax ([rows, vocab]) and reads the chosen token from the
    next step's `input_ids`, so memory does not grow with the answer length (keeping every
    step's scores, as `output_scores` does, would be [steps, rows, vocab]).
    """

    def __init__(self):
        self._last: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._last is not None:
            self.steps.append(self._last.gather(1, input_ids[:, -1:]).squeeze(1))
        self._last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def per_token(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[rows, steps] log-probabilities of `new_tokens` (the generated ids)."""
        steps = list(self.steps)
        if self._last is not None and len(steps) < new_tokens.shape[1]:
            steps.append(self._last.gather(1, new_tokens[:, -1:]).squeeze(1))
        return torch.stack(steps, dim=1)


class ZiyaBlip2ForCausalLM(Blip2PreTrainedModel):
    """Ziya-Visual: ViT-g -> Q-Former (32 queries) -> projection -> LLaMA."""

    config: Blip2Config
    main_input_name = "pixel_values"
    # As transformers' BLIP-2: the Q-Former and its queries stay fp32 when loading in fp16
    # (transformers applies this list to fp16 only; bf16 has fp32's range).
    _keep_in_fp32_modules = ["query_tokens", "qformer"]  # noqa: RUF012 (transformers' API)
    _supports_flash_attn = False  # the Q-Former does not support FA2

    def __init__(self, config: Blip2Config, language_model: nn.Module | None = None):
        super().__init__(config)
        qformer_hidden = config.qformer_config.hidden_size
        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        self.query_tokens = nn.Parameter(
            torch.zeros(1, zc.num_query_tokens(config), qformer_hidden)
        )
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.language_projection = nn.Linear(qformer_hidden, config.text_config.hidden_size)
        if language_model is None:
            # Random LLaMA from the config: tiny checkpoints and real-size benchmarks only. The
            # released model always receives its merged LLaMA via from_pretrained(...).
            language_model = LlamaForCausalLM._from_config(config.text_config)
        self.language_model = language_model
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ZiyaBlip2ForCausalLM):
            init.zeros_(module.query_tokens)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str,
        *model_args: Any,
        language_model: nn.Module | None = None,
        **kwargs: Any,
    ) -> "ZiyaBlip2ForCausalLM":
        """Load the visual checkpoint strictly, then attach `language_model`.

        `ZiyaBlip2ForCausalLM.from_pretrained(visual_dir, language_model=LlamaForCausalLM
        .from_pretrained(llm_dir))`, as the release is used. transformers would treat the
        passed-in LLaMA's keys as missing from the visual checkpoint and re-materialize them
        (empty, then random), so the visual part is loaded around an empty placeholder and the
        real language model is attached afterwards. Any missing or unexpected visual key is an
        error that lists the keys. `trust_remote_code` is refused.
        """
        if language_model is None:
            raise ValueError(
                "ZiyaBlip2ForCausalLM.from_pretrained needs language_model="
                "LlamaForCausalLM.from_pretrained(merged_llm_dir): the visual checkpoint holds "
                "no language-model weights"
            )
        if kwargs.pop("trust_remote_code", False):
            raise ValueError("trust_remote_code is never used for Ziya-Visual")
        if kwargs.get("weights_only", True) is not True:
            raise ValueError("weights_only=False would unpickle arbitrary code; refused")
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path,
            *model_args,
            language_model=_LanguageModelPlaceholder(),
            output_loading_info=True,
            **kwargs,
        )
        check_loading_info(info, source=str(pretrained_model_name_or_path))
        lm_hidden = language_model.get_input_embeddings().weight.shape[1]
        if lm_hidden != model.language_projection.out_features:
            raise ValueError(
                f"language model hidden size {lm_hidden} does not match the visual checkpoint's "
                f"projection ({model.language_projection.out_features}): wrong LLM directory?"
            )
        model.language_model = language_model
        return (model, info) if want_info else model

    # -- embeddings ------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    @property
    def lm_dtype(self) -> torch.dtype:
        """dtype of the language model's token embeddings (what image embeds are cast to)."""
        return self.get_input_embeddings().weight.dtype

    @property
    def lm_device(self) -> torch.device:
        return self.get_input_embeddings().weight.device

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images -> projected query embeddings, ready to sit among the LM's token embeddings.

        pixel_values: [n_images, 3, S, S] (normalized) -> [n_images, num_query_tokens, lm_hidden]
        in the language model's dtype and on its device.
        """
        return self._encode_images(pixel_values)

    def _encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision_param = self.vision_model.embeddings.patch_embedding.weight
        pixel_values = pixel_values.to(device=vision_param.device, dtype=vision_param.dtype)
        # step 1: vision encoder, [n, 3, S, S] -> [n, 1 + (S/patch)^2, vision_hidden]
        image_states = self.vision_model(pixel_values=pixel_values).last_hidden_state
        # step 2: the learned queries cross-attend to the image tokens (all valid, so no mask),
        # [n, num_query_tokens, qformer_hidden]
        queries = self.query_tokens.expand(image_states.shape[0], -1, -1)
        query_states = self.qformer(
            query_embeds=queries, encoder_hidden_states=image_states
        ).last_hidden_state
        # step 3: project into the LM's embedding space, [n, num_query_tokens, lm_hidden]
        projection = self.language_projection.weight
        image_embeds = self.language_projection(query_states.to(projection.dtype))
        return image_embeds.to(device=self.lm_device, dtype=self.lm_dtype)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        image_offset: int = 1,
        labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """One forward pass over `[input_ids[:, :image_offset] | image | input_ids[:, offset:]]`.

        pixel_values [B, 3, S, S]; input_ids and attention_mask [B, T] (the text with bos and
        prefix first: `image_offset` tokens go before the image). Logits: [B, T + n_query, V].
        `labels` [B, T] are aligned to input_ids; image positions get -100.
        """
        # steps 1-3: vision encoder -> Q-Former -> projection, [B, n_query, lm_hidden]
        image_embeds = self._encode_images(pixel_values)
        # step 4: splice the image between the prefix and the turns, then run the LM
        text_embeds = self.get_input_embeddings()(input_ids.to(self.lm_device))
        inputs_embeds = torch.cat(
            [text_embeds[:, :image_offset], image_embeds, text_embeds[:, image_offset:]], dim=1
        )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.lm_device)
        image_mask = attention_mask.new_ones(image_embeds.shape[:2])
        attention_mask = torch.cat(
            [attention_mask[:, :image_offset], image_mask, attention_mask[:, image_offset:]], dim=1
        )
        if labels is not None:
            labels = labels.to(self.lm_device)
            ignore = labels.new_full(image_embeds.shape[:2], -100)
            labels = torch.cat([labels[:, :image_offset], ignore, labels[:, image_offset:]], 1)
        return self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs
        )

    # -- answering -------------------------------------------------------------------------

    def prompt_ids(
        self,
        tokenizer: PreTrainedTokenizerBase,
        queries: Sequence[str],
        histories: Sequence[History | None] | None = None,
        layout: PromptLayout | None = None,
        answers: Sequence[str] | None = None,
    ) -> list[PromptIds]:
        """Each row's prompt as token ids, with the place of its image (one tokenizer call).

        With `answers`, each row's answer is appended as the model would have produced it (the
        text right after `<bot>:`, then eos): the sequences that scoring and training read.
        """
        histories = list(histories) if histories is not None else [None] * len(queries)
        if len(histories) != len(queries):
            raise ValueError(
                f"queries and histories must have one entry per row, got {len(queries)} "
                f"and {len(histories)}"
            )
        layout = layout or zc.prompt_layout(self.config)
        prompts = []
        for row, (query, history) in enumerate(zip(queries, histories, strict=True)):
            past_q, past_a = history if history is not None else ((), ())
            segments = build_prompt(
                query,
                past_q,
                past_a,
                human_name=zc.human_name(self.config),
                assistant_name=zc.assistant_name(self.config),
                prompt_prefix=zc.prompt_prefix(self.config),
                layout=layout,
            )
            if answers is not None:
                segments = [*segments[:-1], segments[-1] + answers[row], EOS]
            prompts.append(segments)
        return segments_to_ids(tokenizer, prompts)

    def _embed_rows(
        self,
        rows: Sequence[PromptIds],
        image_embeds: torch.Tensor,
        image_index: Sequence[int],
        pad_id: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded embeddings `[pads | ids before image | image | ids after]` per row.

        image_embeds [n_images, n_query, H]; returns inputs_embeds [B, L, H] and attention_mask
        [B, L] (0 on pads). The image embeddings are scattered into place in one op.
        """
        n_images, n_query, _ = image_embeds.shape
        if len(image_index) != len(rows):
            raise ValueError(
                f"image_index needs one entry per row, got {len(image_index)} for {len(rows)}"
            )
        bad = [i for i in image_index if not 0 <= i < n_images]
        if bad:
            raise ValueError(f"image_index {bad} out of range for {n_images} images")
        total = max(len(r.ids) + n_query for r in rows)
        ids = torch.full((len(rows), total), pad_id, dtype=torch.long)
        is_image = torch.zeros((len(rows), total), dtype=torch.bool)
        attention = torch.zeros((len(rows), total), dtype=torch.long)
        for row, r in enumerate(rows):
            start = total - len(r.ids) - n_query
            image_start = start + r.image_at
            ids[row, start:image_start] = torch.tensor(r.ids[: r.image_at], dtype=torch.long)
            ids[row, image_start + n_query :] = torch.tensor(r.ids[r.image_at :], dtype=torch.long)
            is_image[row, image_start : image_start + n_query] = True
            attention[row, start:] = 1
        device = self.lm_device
        embeds = self.get_input_embeddings()(ids.to(device, non_blocking=True))
        index = torch.as_tensor(list(image_index), dtype=torch.long, device=image_embeds.device)
        rows_images = image_embeds.index_select(0, index).to(device=device, dtype=embeds.dtype)
        # Row-major order of the mask matches [row, query] order of rows_images.
        embeds = embeds.masked_scatter(is_image.to(device).unsqueeze(-1), rows_images)
        return embeds, attention.to(device, non_blocking=True)

    def build_inputs(
        self,
        tokenizer: PreTrainedTokenizerBase,
        queries: Sequence[str],
        image_embeds: torch.Tensor,
        image_index: Sequence[int],
        histories: Sequence[History | None] | None = None,
        layout: PromptLayout | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt embeddings and attention mask for a batch of rows (see
        `prompt_ids` for the tokens and `_embed_rows` for the shapes)."""
        rows = self.prompt_ids(tokenizer, queries, histories, layout)
        return self._embed_rows(rows, image_embeds, image_index, _pad_id(tokenizer))

    @torch.inference_mode()
    def answer_batch(
        self,
        tokenizer: PreTrainedTokenizerBase,
        queries: Sequence[str],
        image_embeds: torch.Tensor,
        image_index: Sequence[int] | None = None,
        histories: Sequence[History | None] | None = None,
        generation: GenerationSettings | None = None,
        layout: PromptLayout | None = None,
        extra: dict[str, Any] | None = None,
    ) -> list[Answer]:
        """Answer a batch of rows with one `generate` call.

        queries: one question per row; image_embeds: [n_images, n_query, H] from
        `encode_images`; image_index[row] picks the row's image (several rows may share one, so
        each image is encoded once); histories[row] = (past queries, past answers), oldest
        first, or None. `extra`: further `GenerationConfig` keys. Under greedy decoding and
        beam search the answers equal those of `chat()` row by row.
        """
        generation = generation or GenerationSettings()
        if not queries:
            return []
        if image_index is None:
            if image_embeds.shape[0] != len(queries):
                raise ValueError(
                    f"without image_index, one image per row is needed: got "
                    f"{image_embeds.shape[0]} images for {len(queries)} rows"
                )
            image_index = range(len(queries))
        config = generation.generation_config(tokenizer, extra)
        processors = LogitsProcessorList()
        if config.repetition_penalty not in (None, 1.0):
            processors.append(_RepetitionPenalty(config.repetition_penalty))
            config.repetition_penalty = 1.0  # applied above, not by transformers (see there)
        inputs_embeds, attention_mask = self.build_inputs(
            tokenizer, queries, image_embeds, list(image_index), histories, layout
        )
        # step 5: decode. Greedy/sampling record each chosen token's log-prob on the way; beam
        # search returns each beam's length-normalized score.
        if config.num_beams > 1:
            config.return_dict_in_generate = config.output_scores = True
            out = self.language_model.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=processors,
            )
            new_tokens = out.sequences
            counts = _count_generated(new_tokens, tokenizer.eos_token_id)
            # sequences_scores = sum / length**length_penalty -> back to a mean per token.
            lengths = counts.to(out.sequences_scores.device).float().clamp(min=1)
            means = out.sequences_scores.float() * lengths**config.length_penalty / lengths
        else:
            recorder = _ChosenLogprobs()
            new_tokens = self.language_model.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([*processors, recorder]),
            )
            counts = _count_generated(new_tokens, tokenizer.eos_token_id)
            per_token = recorder.per_token(new_tokens)
            steps = torch.arange(per_token.shape[1], device=per_token.device)
            valid = steps.unsqueeze(0) < counts.to(per_token.device).unsqueeze(1)
            means = (per_token * valid).sum(1) / valid.sum(1).clamp(min=1)
        rows = new_tokens.cpu().tolist()
        return [
            Answer(
                text=tokenizer.decode(row[:count], skip_special_tokens=True).strip(),
                num_tokens=int(count),
                mean_logprob=float(mean),
            )
            for row, count, mean in zip(rows, counts.tolist(), means.tolist(), strict=True)
        ]

    @torch.inference_mode()
    def score_answers(
        self,
        tokenizer: PreTrainedTokenizerBase,
        queries: Sequence[str],
        answers: Sequence[str],
        image_embeds: torch.Tensor,
        image_index: Sequence[int] | None = None,
        histories: Sequence[History | None] | None = None,
        layout: PromptLayout | None = None,
    ) -> list[float]:
        """Mean log-likelihood per token of each given answer (its text, then eos) after its
        prompt: how much the model agrees with a reference answer under `layout`.

        Teacher-forced, one forward pass for the batch; what `python -m ziya_model.probe`
        compares across layouts.
        """
        image_index = list(image_index) if image_index is not None else list(range(len(queries)))
        prompts = self.prompt_ids(tokenizer, queries, histories, layout)
        full = self.prompt_ids(tokenizer, queries, histories, layout, answers=answers)
        embeds, attention = self._embed_rows(full, image_embeds, image_index, _pad_id(tokenizer))
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        logits = self.language_model(
            inputs_embeds=embeds, attention_mask=attention, position_ids=positions
        ).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        n_query = image_embeds.shape[1]
        total = embeds.shape[1]
        scores = []
        for row, (p, f) in enumerate(zip(prompts, full, strict=True)):
            # The answer starts where the two token lists part (":" may merge with its text).
            start = next(
                (k for k, (a, b) in enumerate(zip(p.ids, f.ids, strict=False)) if a != b),
                min(len(p.ids), len(f.ids)),
            )
            offset = total - len(f.ids) - n_query  # left pads
            targets = torch.tensor(f.ids[start:], device=logprobs.device)
            # Token k sits at offset + k (+ n_query after the image); logits at p predict p + 1.
            at = torch.arange(start, len(f.ids), device=logprobs.device)
            at = offset + at + n_query * (at >= f.image_at) - 1
            scores.append(float(logprobs[row, at, targets].mean()))
        return scores

    def chat(
        self,
        tokenizer: PreTrainedTokenizerBase,
        pixel_values: torch.Tensor,
        query: str,
        previous_querys: Sequence[str] = (),
        previous_outputs: Sequence[str] = (),
        **generate_config: Any,
    ) -> str:
        """The seed's API: answer `query` about one image given the earlier turns (oldest first).

        pixel_values: [1, 3, S, S] or [3, S, S]. `generate_config` takes `GenerationSettings`
        fields and any other `GenerationConfig` key, as the release handed them to `generate`
        (`num_beams=3`, `top_k=...`); an unknown key is an error. Greedy unless
        `do_sample=True` (the public demo passed temperature/top_p without sampling, so they had
        no effect there).
        """
        return self.chat_answer(
            tokenizer, pixel_values, query, previous_querys, previous_outputs, **generate_config
        ).text

    def chat_answer(
        self,
        tokenizer: PreTrainedTokenizerBase,
        pixel_values: torch.Tensor,
        query: str,
        previous_querys: Sequence[str] = (),
        previous_outputs: Sequence[str] = (),
        **generate_config: Any,
    ) -> Answer:
        """`chat()` with the whole `Answer`: text, generated tokens and confidence."""
        settings, extra = GenerationSettings.split(generate_config)
        if pixel_values.dim() == 3:
            pixel_values = pixel_values.unsqueeze(0)
        if pixel_values.shape[0] != 1:
            raise ValueError(f"chat() takes one image, got {pixel_values.shape[0]}")
        image_embeds = self.encode_images(pixel_values)
        return self.answer_batch(
            tokenizer,
            [query],
            image_embeds,
            image_index=[0],
            histories=[(list(previous_querys), list(previous_outputs))],
            generation=settings,
            extra=extra,
        )[0]


# The name an early release README used; the seed's code imports it.
ZiyaBLIP2ForConditionalGeneration = ZiyaBlip2ForCausalLM


class _LanguageModelPlaceholder(nn.Module):
    """Stands in for the LLaMA while transformers loads the visual checkpoint (no parameters,
    so the LLaMA's keys are neither expected nor re-materialized)."""

    def get_input_embeddings(self) -> nn.Module | None:
        return None

    def get_output_embeddings(self) -> nn.Module | None:
        return None


def _count_generated(new_tokens: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """Generated tokens per row up to and including the first eos; all of them if no eos."""
    length = new_tokens.shape[1]
    if eos_token_id is None:
        return torch.full((new_tokens.shape[0],), length, dtype=torch.long)
    is_eos = new_tokens == eos_token_id
    first = is_eos.int().argmax(dim=1)
    return torch.where(is_eos.any(dim=1), first + 1, torch.full_like(first, length))


def check_loading_info(info: dict[str, Any], *, source: str) -> None:
    """Raise if loading the visual checkpoint left keys missing, unexpected or mismatched."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            problems.append(f"{kind.replace('_', ' ')} ({len(keys)}): {', '.join(keys)}")
    if problems:
        raise ValueError(
            f"visual checkpoint {source} does not match the model: " + "; ".join(problems)
        )
