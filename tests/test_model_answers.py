"""Batched answers, chat() and the forward on the tiny Ziya-Visual checkpoint (CPU, real classes)."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from ziya_model import Answer, GenerationSettings, load_ziya, write_tiny_checkpoint
from ziya_model.modeling import _count_generated

QUESTIONS = [
    "What is in the picture?",
    "Describe the image in detail.",
    "这张图片里有什么？",
    "How many people are there? Please answer the question about the image.",
    "Is there a dog?",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    model, tokenizer, processor = load_ziya(ckpt.visual_dir, ckpt.llm_dir)
    return model, tokenizer, processor


@pytest.fixture(scope="module")
def pixels(tiny):
    _, _, processor = tiny
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    return processor([Image.fromarray(p) for p in photos])


def _rows():
    """Rows with different prompt lengths, shared images and histories."""
    return [
        (QUESTIONS[0], 0, None),
        (QUESTIONS[1], 1, (["What is it?"], ["A cup of coffee."])),
        (QUESTIONS[2], 2, None),
        (QUESTIONS[3], 0, (["这是哪里？", "What color?"], ["一个公园。", "Blue and white."])),
        (QUESTIONS[4], 3, None),
        (QUESTIONS[0], 2, (["Is it a cat?"], ["Yes."])),
    ]


def test_batched_greedy_equals_chat_row_by_row(tiny, pixels):
    model, tokenizer, _ = tiny
    rows = _rows()
    settings = GenerationSettings(max_new_tokens=24)
    embeds = model.encode_images(pixels)
    answers = model.answer_batch(
        tokenizer,
        queries=[q for q, _, _ in rows],
        image_embeds=embeds,
        image_index=[i for _, i, _ in rows],
        histories=[h for _, _, h in rows],
        generation=settings,
    )
    singles = [
        model.chat(
            tokenizer=tokenizer,
            pixel_values=pixels[i : i + 1],
            query=q,
            previous_querys=h[0] if h else [],
            previous_outputs=h[1] if h else [],
            max_new_tokens=24,
        )
        for q, i, h in rows
    ]
    assert [a.text for a in answers] == singles
    assert all(a.num_tokens == 24 for a in answers)  # the tiny model never chose eos here
    # The answers really depend on image and prompt (otherwise the comparison proves little).
    assert len(set(singles)) == len(singles)


def test_multi_question_rows_encode_each_image_once(tiny, pixels):
    model, tokenizer, _ = tiny
    calls = []
    hook = model.vision_model.register_forward_hook(
        lambda _m, _args, kwargs, _out: calls.append(kwargs["pixel_values"].shape[0]),
        with_kwargs=True,
    )
    try:
        images = pixels[:2]
        embeds = model.encode_images(images)
        answers = model.answer_batch(
            tokenizer,
            queries=QUESTIONS[:4] + QUESTIONS[:4],
            image_embeds=embeds,
            image_index=[0, 0, 0, 0, 1, 1, 1, 1],
            generation=GenerationSettings(max_new_tokens=6),
        )
    finally:
        hook.remove()
    assert calls == [2]  # one vision forward over the 2 images, for 8 answers
    assert len(answers) == 8 and all(isinstance(a, Answer) for a in answers)
    # Same question on different images gives different answers; the rows were not mixed up.
    assert answers[0].text != answers[4].text


def test_answer_counts_tokens_through_eos(tiny, pixels):
    model, tokenizer, _ = tiny
    eos = tokenizer.eos_token_id

    def favour_eos(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., eos] += 1000.0  # eos wins as soon as min_new_tokens allows it
        return logits

    hook = model.language_model.lm_head.register_forward_hook(favour_eos)
    try:
        embeds = model.encode_images(pixels[:2])
        answers = model.answer_batch(
            tokenizer,
            ["What is in the picture?", "Describe the image in detail."],
            embeds,
            generation=GenerationSettings(max_new_tokens=10, min_new_tokens=3),
        )
    finally:
        hook.remove()
    assert [a.num_tokens for a in answers] == [4, 4]  # 3 forced tokens + eos, pads not counted
    assert all(a.text and "</s>" not in a.text for a in answers)


def test_count_generated_handles_eos_and_pads():
    tokens = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    assert _count_generated(tokens, eos_token_id=2).tolist() == [3, 5, 1]
    assert _count_generated(tokens, eos_token_id=None).tolist() == [5, 5, 5]


def test_sampling_only_when_asked(tiny, pixels):
    model, tokenizer, _ = tiny
    kwargs = dict(
        tokenizer=tokenizer, pixel_values=pixels[0], query=QUESTIONS[1], max_new_tokens=16
    )
    greedy = {model.chat(**kwargs, temperature=5.0, top_p=1.0) for _ in range(3)}
    assert len(greedy) == 1  # temperature/top_p are ignored without do_sample
    torch.manual_seed(0)
    sampled = {model.chat(**kwargs, do_sample=True, temperature=5.0, top_p=1.0) for _ in range(3)}
    assert len(sampled) == 3


def test_forward_logits_match_first_generated_token(tiny, pixels):
    model, tokenizer, _ = tiny
    before, after = "", "<human>:What is in the picture?\n<bot>:"
    ids = [tokenizer.bos_token_id, *tokenizer(before + after, add_special_tokens=False).input_ids]
    with torch.inference_mode():
        out = model(pixel_values=pixels[:1], input_ids=torch.tensor([ids]), image_offset=1)
    assert out.logits.shape == (1, len(ids) + 32, len(tokenizer))
    first = int(out.logits[0, -1].argmax())
    answer = model.answer_batch(
        tokenizer,
        [after.removeprefix("<human>:").removesuffix("\n<bot>:")],
        model.encode_images(pixels[:1]),
        [0],
        None,
        GenerationSettings(max_new_tokens=1),
    )[0]
    assert answer.text == tokenizer.decode([first], skip_special_tokens=True).strip()


def test_image_embeds_have_lm_dtype_and_shape(tiny, pixels):
    model, _, _ = tiny
    embeds = model.encode_images(pixels[:3])
    assert embeds.shape == (3, 32, model.config.text_config.hidden_size)
    assert embeds.dtype == model.lm_dtype == torch.float32
    assert not torch.allclose(embeds[0], embeds[1])


def test_bf16_loading_casts_image_embeds(tmp_path, pixels):
    ckpt = write_tiny_checkpoint(tmp_path)
    model, tokenizer, _ = load_ziya(ckpt.visual_dir, ckpt.llm_dir, dtype="bf16")
    assert model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert model.language_model.dtype == torch.bfloat16
    embeds = model.encode_images(pixels[:1])
    assert embeds.dtype == torch.bfloat16
    (answer,) = model.answer_batch(
        tokenizer, ["Is there a dog?"], embeds, [0], None, GenerationSettings(max_new_tokens=4)
    )
    assert answer.num_tokens == 4


def test_bad_batch_arguments_are_explained(tiny, pixels):
    model, tokenizer, _ = tiny
    embeds = model.encode_images(pixels[:1])
    with pytest.raises(ValueError, match="out of range"):
        model.answer_batch(tokenizer, ["q"], embeds, image_index=[3])
    with pytest.raises(ValueError, match="one image per row"):
        model.answer_batch(tokenizer, ["q", "r"], embeds)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    assert model.answer_batch(tokenizer, [], embeds) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batched_equals_chat_and_bf16_runs(tmp_path, pixels):
    ckpt = write_tiny_checkpoint(tmp_path)
    model, tokenizer, processor = load_ziya(ckpt.visual_dir, ckpt.llm_dir, device="cuda")
    rows = _rows()
    on_device = pixels.to("cuda")
    answers = model.answer_batch(
        tokenizer,
        [q for q, _, _ in rows],
        model.encode_images(on_device),
        [i for _, i, _ in rows],
        [h for _, _, h in rows],
        GenerationSettings(max_new_tokens=16),
    )
    singles = [
        model.chat(tokenizer, on_device[i : i + 1], q, *(h or ([], [])), max_new_tokens=16)
        for q, i, h in rows
    ]
    assert [a.text for a in answers] == singles
    bf16, tokenizer, processor = load_ziya(ckpt.visual_dir, ckpt.llm_dir, "bf16", "cuda")
    raw = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8, device="cuda")
    embeds = bf16.encode_images(processor.normalize(raw, torch.bfloat16))
    assert embeds.dtype == torch.bfloat16 and embeds.device.type == "cuda"
    got = bf16.answer_batch(
        tokenizer,
        ["Is there a dog?"] * 4,
        embeds,
        generation=GenerationSettings(max_new_tokens=8, min_new_tokens=8),
    )
    assert [a.num_tokens for a in got] == [8, 8, 8, 8]


def test_batched_beam_search_equals_chat_row_by_row(tiny, pixels):
    """`num_beams=3` in a left-padded batch gives each row the answer it gets alone."""
    model, tokenizer, _ = tiny
    rows = _rows()
    settings = GenerationSettings(max_new_tokens=12, num_beams=3)
    answers = model.answer_batch(
        tokenizer,
        queries=[q for q, _, _ in rows],
        image_embeds=model.encode_images(pixels),
        image_index=[i for _, i, _ in rows],
        histories=[h for _, _, h in rows],
        generation=settings,
    )
    singles = [
        model.chat(
            tokenizer,
            pixels[i : i + 1],
            q,
            h[0] if h else [],
            h[1] if h else [],
            max_new_tokens=12,
            num_beams=3,
        )
        for q, i, h in rows
    ]
    assert [a.text for a in answers] == singles
    assert len(set(singles)) == len(singles)
    greedy = model.answer_batch(
        tokenizer,
        [rows[0][0]],
        model.encode_images(pixels[:1]),
        generation=GenerationSettings(max_new_tokens=12),
    )
    # Beam search keeps the best-scoring beam: at least as likely per token as greedy's pick.
    assert answers[0].mean_logprob >= greedy[0].mean_logprob - 1e-4


def test_answer_confidence_is_the_mean_token_logprob(tiny, pixels):
    model, tokenizer, _ = tiny
    embeds = model.encode_images(pixels)
    settings = GenerationSettings(max_new_tokens=10, repetition_penalty=1.0)
    batch = model.answer_batch(
        tokenizer, ["Is there a dog?", "What is in the picture?"], embeds[:2], generation=settings
    )
    alone = model.answer_batch(tokenizer, ["Is there a dog?"], embeds[:1], generation=settings)
    assert batch[0].mean_logprob == pytest.approx(alone[0].mean_logprob, abs=1e-4)
    assert all(a.mean_logprob < 0 and a.num_tokens == 10 for a in batch)
    # Each step's log-prob is at most log(1) and, for greedy, at least log(1 / vocab).
    assert all(-np.log(len(tokenizer)) <= a.mean_logprob for a in batch)
