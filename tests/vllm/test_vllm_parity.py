"""The vLLM engine answers exactly as the transformers engine (greedy, fp32, tiny checkpoint),
and its prefix cache serves an image's later questions, never another image's.

Both engines read the same checkpoint and the same uint8 pixels (the pipeline's fast path);
prompts come from one function (`ziya_model.tokenization.prompt_token_ids`) in both.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from pipeline.config import DEFAULT_CAPTION_PROMPT
from tests.vllm.conftest import cpu_options

pytestmark = pytest.mark.slow

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
VQA = [
    "What is in the picture?",
    "这张图片里有什么？",
    "How many people are there?",
    "Is there a dog?",
]


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    """(transformers model, tokenizer, uint8 images, vLLM engine) on the tiny checkpoint."""
    from ziya_model import load_ziya
    from ziya_model.vllm.engine import ZiyaVLLMEngine

    model, tokenizer, processor = load_ziya(tiny_checkpoint.visual_dir, tiny_checkpoint.llm_dir)
    images = [processor.preprocess_uint8(Image.fromarray(getattr(data, p)())) for p in PHOTOS]
    engine = ZiyaVLLMEngine(tiny_checkpoint.visual_dir, tiny_checkpoint.llm_dir, cpu_options())
    yield model, tokenizer, processor, images, engine
    engine.close()


def _rows():
    """(image index, question, history) for captions, VQA, a 4-question row and history."""
    caption = [(i, DEFAULT_CAPTION_PROMPT, None) for i in range(4)]
    vqa = [(i, q, None) for i, q in enumerate(VQA)]
    multi = [(2, q, None) for q in VQA]  # one image, four questions
    history = [
        (1, "What color is it?", (["What is it?"], ["A cup of coffee."])),
        (0, "这是哪里？", (["这是什么？", "What color?"], ["一个宇航员。", "White and blue."])),
        (3, "Describe the image in detail.", (["Is it a rocket?"], ["Yes."])),
    ]
    return {"caption": caption, "vqa": vqa, "multi_question": multi, "history": history}


def _transformers_answers(model, tokenizer, processor, images, rows, settings):
    pixels = processor.normalize(torch.from_numpy(np.stack(images)), torch.float32)
    embeds = model.encode_images(pixels)
    return model.answer_batch(
        tokenizer,
        queries=[q for _, q, _ in rows],
        image_embeds=embeds,
        image_index=[i for i, _, _ in rows],
        histories=[h for _, _, h in rows],
        generation=settings,
    )


def _vllm_answers(engine, images, rows, settings):
    from ziya_model.vllm.engine import Request

    requests = [Request(images[i], q, *(h if h else ((), ()))) for i, q, h in rows]
    return engine.answer(requests, settings)


@pytest.mark.parametrize("repetition_penalty", [1.18, 1.0])
def test_greedy_answers_equal_the_transformers_engine(engines, repetition_penalty):
    from ziya_model import GenerationSettings

    model, tokenizer, processor, images, engine = engines
    settings = GenerationSettings(max_new_tokens=24, repetition_penalty=repetition_penalty)
    for kind, rows in _rows().items():
        expected = _transformers_answers(model, tokenizer, processor, images, rows, settings)
        got = _vllm_answers(engine, images, rows, settings)
        assert [a.text for a in got] == [a.text for a in expected], kind
        assert [a.num_tokens for a in got] == [a.num_tokens for a in expected], kind
        for g, e in zip(got, expected, strict=True):
            assert g.mean_logprob == pytest.approx(e.mean_logprob, abs=1e-4), kind
        # The answers depend on image and prompt, so equality above means something.
        assert len({a.text for a in expected}) == len(rows), kind


@pytest.fixture(scope="module")
def eos_engines(engines, tmp_path_factory):
    """The tiny checkpoint with eos made likely: its lm_head row is the row of the token the
    model picks most often, scaled by 1.05, so greedy answers end at eos at various lengths
    (the random model otherwise never ends one)."""
    import collections

    from safetensors.torch import load_file, save_file

    from ziya_model import GenerationSettings, load_ziya, write_tiny_checkpoint
    from ziya_model.loading import write_weights_manifest
    from ziya_model.vllm.engine import ZiyaVLLMEngine

    model, tokenizer, processor, images, _ = engines
    rows = [r for rs in _rows().values() for r in rs]
    answers = _transformers_answers(
        model, tokenizer, processor, images, rows, GenerationSettings(max_new_tokens=24)
    )
    counts = collections.Counter(
        i for a in answers for i in tokenizer(a.text, add_special_tokens=False)["input_ids"]
    )
    common = counts.most_common(1)[0][0]
    tiny = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-eos"))  # same seed, same weights
    weights = tiny.llm_dir / "model.safetensors"
    state = load_file(str(weights))
    state["lm_head.weight"][tokenizer.eos_token_id] = state["lm_head.weight"][common] * 1.05
    save_file(state, str(weights), metadata={"format": "pt"})
    write_weights_manifest(tiny.llm_dir)
    eos_model, eos_tokenizer, _ = load_ziya(tiny.visual_dir, tiny.llm_dir)
    engine = ZiyaVLLMEngine(tiny.visual_dir, tiny.llm_dir, cpu_options())
    yield eos_model, eos_tokenizer, processor, images, engine
    engine.close()


def test_eos_and_min_new_tokens_stop_like_transformers(eos_engines):
    """An early eos ends both engines' answers at the same token (and min_new_tokens holds it)."""
    from ziya_model import GenerationSettings

    model, tokenizer, processor, images, engine = eos_engines
    rows = [r for rs in _rows().values() for r in rs]
    stopped_early = 0
    for settings in (
        GenerationSettings(max_new_tokens=32),
        GenerationSettings(max_new_tokens=32, min_new_tokens=12),
        GenerationSettings(max_new_tokens=32, no_repeat_ngram_size=2, repetition_penalty=1.0),
    ):
        expected = _transformers_answers(model, tokenizer, processor, images, rows, settings)
        got = _vllm_answers(engine, images, rows, settings)
        assert [(a.text, a.num_tokens) for a in got] == [
            (a.text, a.num_tokens) for a in expected
        ], settings
        assert all(a.num_tokens >= settings.min_new_tokens for a in got)
        stopped_early += sum(a.num_tokens < settings.max_new_tokens for a in expected)
    assert stopped_early > 0  # some answers did end at eos, so stopping was compared
    print(f"eos parity: {stopped_early} of {3 * len(rows)} answers ended at eos")


def test_beam_search_is_refused_with_a_reason(engines):
    from ziya_model import GenerationSettings

    *_, images, engine = engines
    from ziya_model.vllm.engine import Request

    with pytest.raises(ValueError, match="beam search is not available on the vLLM engine"):
        engine.answer([Request(images[0], "What?")], GenerationSettings(num_beams=2))


def test_prefix_cache_serves_later_questions_of_an_image_only(engines):
    from ziya_model import GenerationSettings
    from ziya_model.vllm.engine import Request

    *_, images, engine = engines
    settings = GenerationSettings(max_new_tokens=4)
    # A fresh image (mirrored) so nothing of it is cached from the other tests.
    image = np.ascontiguousarray(images[0][:, :, ::-1])
    other = np.ascontiguousarray(images[1][:, ::-1, :])

    def cached(request) -> tuple[int, int]:
        before = engine.stats()
        engine.answer([request], settings)
        after = engine.stats()
        return (
            after.cached_prompt_tokens - before.cached_prompt_tokens,
            after.prompt_tokens - before.prompt_tokens,
        )

    first, prompt = cached(Request(image, VQA[0]))
    assert first == 0 and prompt > 32
    later = [cached(Request(image, q))[0] for q in VQA[1:]]
    # The image's 32 positions fill the first KV block (block size 32, image before bos).
    assert all(hit >= 32 for hit in later), later
    # The same question about another image: its blocks are keyed by that image's hash.
    assert cached(Request(other, VQA[0]))[0] == 0
    print(f"prefix cache: first question 0/{prompt}, later questions {later} tokens cached")
