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
`image_token_index` placeholders; Ziya has none, so this class concatenates embeddings itself
(`[left pads | prefix text | image | turns text]`) and calls
`language_model.generate(inputs_embeds=..., attention_mask=...)`, which returns new tokens only.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    Blip2Config,
    Blip2PreTrainedModel,
    Blip2QFormerModel,
    Blip2VisionModel,
    GenerationConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import configuration as zc
from .prompt import build_prompt

History = tuple[Sequence[str], Sequence[str]]


@dataclass
class GenerationSettings:
    """Decoding options for one `answer_batch` call (the seed's defaults, greedy)."""

    max_new_tokens: int = 128  # hard cap on answer length in tokens (bounds cost per row)
    min_new_tokens: int = 0  # eos is suppressed before this many tokens (benchmarks fix length)
    do_sample: bool = False  # greedy unless asked: the public demo never sampled
    temperature: float = 0.7  # only used when do_sample=True
    top_p: float = 0.1  # only used when do_sample=True
    repetition_penalty: float = 1.0  # >1 discourages repeats (the demo used 1.18)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise ValueError(
                f"sampling needs temperature > 0 and 0 < top_p <= 1, "
                f"got temperature={self.temperature}, top_p={self.top_p}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for the `generation` JSON column of output rows)."""
        return asdict(self)

    def generation_config(self, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
        """A fresh `GenerationConfig`; sampling knobs are passed only when sampling, so greedy
        decoding does not warn about unused flags."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
            "pad_token_id": _pad_id(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "use_cache": True,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return GenerationConfig(**kwargs)


@dataclass(frozen=True)
class Answer:
    """One generated answer: decoded text (new tokens only, special tokens skipped, stripped)
    and the number of generated tokens up to and including eos (pads excluded)."""

    text: str
    num_tokens: int


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    # Ziya pads with id 0; fall back to eos for tokenizers without a pad token.
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


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

    def build_inputs(
        self,
        tokenizer: PreTrainedTokenizerBase,
        queries: Sequence[str],
        image_embeds: torch.Tensor,
        image_index: Sequence[int],
        histories: Sequence[History | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded `[pads | bos + prefix | image | turns]` embeddings for a batch of rows.

        image_embeds [n_images, n_query, H]; returns inputs_embeds [B, L, H] and attention_mask
        [B, L] (0 on pads). The image embeddings are scattered into place in one op.
        """
        n_rows = len(queries)
        histories = list(histories) if histories is not None else [None] * n_rows
        if len(histories) != n_rows or len(image_index) != n_rows:
            raise ValueError(
                f"queries, image_index and histories must have one entry per row, got "
                f"{n_rows}, {len(image_index)} and {len(histories)}"
            )
        n_images, n_query, _ = image_embeds.shape
        bad = [i for i in image_index if not 0 <= i < n_images]
        if bad:
            raise ValueError(f"image_index {bad} out of range for {n_images} images")
        befores, afters = [], []
        for query, history in zip(queries, histories, strict=True):
            past_q, past_a = history if history is not None else ((), ())
            before, after = build_prompt(
                query,
                past_q,
                past_a,
                human_name=zc.human_name(self.config),
                assistant_name=zc.assistant_name(self.config),
                prompt_prefix=zc.prompt_prefix(self.config),
            )
            befores.append(before)
            afters.append(after)
        # bos is added by hand (not add_special_tokens) so no tokenizer ever appends eos here.
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        before_ids = [bos + ids for ids in _token_ids(tokenizer, befores)]
        after_ids = _token_ids(tokenizer, afters)
        lengths = [len(b) + n_query + len(a) for b, a in zip(before_ids, after_ids, strict=True)]
        total = max(lengths)
        pad = _pad_id(tokenizer)
        ids = torch.full((n_rows, total), pad, dtype=torch.long)
        is_image = torch.zeros((n_rows, total), dtype=torch.bool)
        attention = torch.zeros((n_rows, total), dtype=torch.long)
        for row, (b, a, length) in enumerate(zip(before_ids, after_ids, lengths, strict=True)):
            start = total - length
            image_start = start + len(b)
            ids[row, start:image_start] = torch.tensor(b, dtype=torch.long)
            ids[row, image_start + n_query :] = torch.tensor(a, dtype=torch.long)
            is_image[row, image_start : image_start + n_query] = True
            attention[row, start:] = 1
        device = self.lm_device
        embeds = self.get_input_embeddings()(ids.to(device, non_blocking=True))
        index = torch.as_tensor(list(image_index), dtype=torch.long, device=image_embeds.device)
        rows_images = image_embeds.index_select(0, index).to(device=device, dtype=embeds.dtype)
        # Row-major order of the mask matches [row, query] order of rows_images.
        embeds = embeds.masked_scatter(is_image.to(device).unsqueeze(-1), rows_images)
        return embeds, attention.to(device, non_blocking=True)

    @torch.inference_mode()
    def answer_batch(
        self,
        tokenizer: PreTrainedTokenizerBase,
        queries: Sequence[str],
        image_embeds: torch.Tensor,
        image_index: Sequence[int] | None = None,
        histories: Sequence[History | None] | None = None,
        generation: GenerationSettings | None = None,
    ) -> list[Answer]:
        """Answer a batch of rows with one `generate` call.

        queries: one question per row; image_embeds: [n_images, n_query, H] from
        `encode_images`; image_index[row] picks the row's image (several rows may share one, so
        each image is encoded once); histories[row] = (past queries, past answers) or None.
        Under greedy decoding the answers equal those of `chat()` row by row.
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
        inputs_embeds, attention_mask = self.build_inputs(
            tokenizer, queries, image_embeds, image_index, histories
        )
        new_tokens = self.language_model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            generation_config=generation.generation_config(tokenizer),
        )
        counts = _count_generated(new_tokens, tokenizer.eos_token_id).tolist()
        rows = new_tokens.cpu().tolist()
        return [
            Answer(
                text=tokenizer.decode(row[:count], skip_special_tokens=True).strip(),
                num_tokens=int(count),
            )
            for row, count in zip(rows, counts, strict=True)
        ]

    def chat(
        self,
        tokenizer: PreTrainedTokenizerBase,
        pixel_values: torch.Tensor,
        query: str,
        previous_querys: Sequence[str] = (),
        previous_outputs: Sequence[str] = (),
        max_new_tokens: int = 128,
        top_p: float = 0.1,
        temperature: float = 0.7,
        repetition_penalty: float = 1.0,
        do_sample: bool = False,
        min_new_tokens: int = 0,
    ) -> str:
        """The seed's API: answer `query` about one image given the earlier turns.

        pixel_values: [1, 3, S, S] or [3, S, S]. Greedy unless `do_sample=True` (the public
        demo passed temperature/top_p without sampling, so they had no effect there).
        """
        if pixel_values.dim() == 3:
            pixel_values = pixel_values.unsqueeze(0)
        if pixel_values.shape[0] != 1:
            raise ValueError(f"chat() takes one image, got {pixel_values.shape[0]}")
        settings = GenerationSettings(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
        )
        image_embeds = self.encode_images(pixel_values)
        answer = self.answer_batch(
            tokenizer,
            [query],
            image_embeds,
            image_index=[0],
            histories=[(list(previous_querys), list(previous_outputs))],
            generation=settings,
        )[0]
        return answer.text


class _LanguageModelPlaceholder(nn.Module):
    """Stands in for the LLaMA while transformers loads the visual checkpoint (no parameters,
    so the LLaMA's keys are neither expected nor re-materialized)."""

    def get_input_embeddings(self) -> nn.Module | None:
        return None

    def get_output_embeddings(self) -> nn.Module | None:
        return None


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    if not any(texts):
        return [[] for _ in texts]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


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
