"""Ziya-Visual as a vLLM model: vLLM's own BLIP-2 with Ziya's image placement and preprocessing.

Imported by vLLM (through `ziya_model.vllm.register`, the `vllm.general_plugins` entry point)
in every process that runs the model, never by the rest of this package.

What differs from vLLM's `Blip2ForConditionalGeneration`, and why:
- The image goes where `ziya_model.tokenization.prompt_token_ids` puts it. vLLM's BLIP-2 inserts
  the 32 image positions at the start of every prompt; Ziya's layout decides the place (before
  bos, or after bos and the prompt prefix). The engine sends prompt ids that already hold 32
  placeholder ids (`image_token_index` of the model directory's config) at that place; the
  processor here only finds them, so vLLM scatters the image embeddings into exactly those
  positions.
- Pixels come from `ZiyaImageProcessor`, not from a transformers processor the model directory
  does not have: an image item is a numpy array [3, S, S], uint8 (the fast path, normalized here
  with the same arithmetic as the transformers engine) or float32 (already normalized: exact
  mode). PIL images are accepted too (exact reference preprocessing).
- Weight names: the LLM's `model.*` / `lm_head.*` are read as `language_model.*`, so the
  model directory links the released weight files unchanged (see `model_dir.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from transformers import BatchFeature
from vllm.model_executor.models.blip2 import (
    Blip2DummyInputsBuilder,
    Blip2ForConditionalGeneration,
    Blip2MultiModalProcessor,
    Blip2ProcessingInfo,
)
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.multimodal.processing.inputs import ProcessorInputs

from ..processing import ZiyaImageProcessor


class ZiyaVisualProcessingInfo(Blip2ProcessingInfo):
    def image_token_id(self) -> int:
        return int(self.get_hf_config().image_token_index)

    def image_size(self) -> int:
        return int(self.get_hf_config().vision_config.image_size)


class ZiyaVisualDummyInputsBuilder(Blip2DummyInputsBuilder):
    """Profiling input: one uint8 image, as the pipeline sends them."""

    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options):
        size = self.info.image_size()
        return {"image": [np.full((3, size, size), 255, np.uint8)] * mm_counts.get("image", 0)}


class ZiyaVisualMultiModalProcessor(Blip2MultiModalProcessor):
    def _image_tokens(self) -> list[int]:
        return [self.info.image_token_id()] * self.info.get_num_image_tokens()

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs) -> BatchFeature:
        images = hf_data["images"]
        processor = ZiyaImageProcessor(self.info.image_size())
        return BatchFeature({"pixel_values": pixel_values(processor, images)})

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        # The prompt already holds the image's 32 positions: find them, change nothing.
        tokens = self._image_tokens()
        return [PromptReplacement(modality="image", target=tokens, replacement=tokens)]

    def get_dummy_inputs(self, seq_len, mm_counts, mm_options) -> ProcessorInputs:
        builder = self.dummy_inputs
        data = builder.get_dummy_mm_data(seq_len, mm_counts, mm_options)
        items = self.info.parse_mm_data(data, validate=False)
        return ProcessorInputs(
            prompt=self._image_tokens() * mm_counts.get("image", 0), mm_data_items=items
        )


def pixel_values(processor: ZiyaImageProcessor, images: Sequence[object]) -> torch.Tensor:
    """Normalized float32 [n, 3, S, S] from uint8 / float32 [3, S, S] arrays or PIL images."""
    if all(isinstance(im, np.ndarray) for im in images):
        stack = torch.from_numpy(np.stack(images))
        if stack.dtype == torch.uint8:
            return processor.normalize(stack, torch.float32)
        if stack.dtype == torch.float32:
            return stack
        raise ValueError(f"image arrays must be uint8 or float32 [3, S, S], got {stack.dtype}")
    return processor(list(images))


@MULTIMODAL_REGISTRY.register_processor(
    ZiyaVisualMultiModalProcessor,
    info=ZiyaVisualProcessingInfo,
    dummy_inputs=ZiyaVisualDummyInputsBuilder,
)
class ZiyaVisualForConditionalGeneration(Blip2ForConditionalGeneration):
    """Ziya-Visual for vLLM: ViT-g -> Q-Former (32 queries) -> projection -> LLaMA."""

    # The merged LLM's own names, under the language model.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.": "language_model.model.",
            "lm_head.": "language_model.lm_head.",
        }
    )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
