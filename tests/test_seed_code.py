"""The seed's own code, pasted as released, runs on this package and gives `load_ziya`'s answers.

The release's model card loads `LlamaForCausalLM`, `LlamaTokenizer` and transformers'
`BlipImageProcessor` itself and imports `ZiyaBLIP2ForConditionalGeneration` from the release's
`modeling_ziya_blip2.py`. Below, SEED_CODE is that code with three changes a user makes: the
import line names this package, the two paths point at the tiny checkpoint and a photograph,
and `model.cuda()` is commented out as the card says to on CPU.
"""

from __future__ import annotations

import pytest
from PIL import Image
from skimage import data

from ziya_model import GenerationSettings, load_ziya, write_tiny_checkpoint

SEED_CODE = """
from transformers import LlamaForCausalLM, LlamaTokenizer, BlipImageProcessor
from ziya_model import ZiyaBLIP2ForConditionalGeneration
from PIL import Image

# model path of IDEA-CCNL/Ziya-LLaMA-13B-v1
LM_MODEL_PATH = LLM_DIR
lm_model = LlamaForCausalLM.from_pretrained(LM_MODEL_PATH)
tokenizer = LlamaTokenizer.from_pretrained(LM_MODEL_PATH)

# visual model
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# demo.py is in the project path, so we can use local path ".". Otherwise you should use "IDEA-CCNL/Ziya-BLIP2-14B-Visual-v1"
model = ZiyaBLIP2ForConditionalGeneration.from_pretrained(VISUAL_DIR, language_model=lm_model)
image_size = model.config.vision_config.image_size
image_processor = BlipImageProcessor(
    size={"height": image_size, "width": image_size},
    image_mean=OPENAI_CLIP_MEAN,
    image_std=OPENAI_CLIP_STD,
)
# model.cuda()  # if you use on cpu, comment this line

generate_config = {
    "max_new_tokens": 128,
    "top_p": 0.1,
    "temperature": 0.7,
    "repetition_penalty": 1.18,
}
output = model.chat(
    tokenizer=tokenizer,
    pixel_values=image_processor(Image.open(IMAGE_PATH), return_tensors="pt").pixel_values.to(model.device),
    query="这是什么游戏",
    previous_querys=[],
    previous_outputs=[],
    **generate_config,
)
print(output)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed")
    tiny = write_tiny_checkpoint(root / "tiny")
    image_path = root / "wzry.jpg"
    Image.fromarray(data.astronaut()).save(image_path, quality=90)
    return tiny, image_path


def test_seed_code_verbatim_equals_load_ziya(setup):
    tiny, image_path = setup
    scope = {
        "LLM_DIR": str(tiny.llm_dir),
        "VISUAL_DIR": str(tiny.visual_dir),
        "IMAGE_PATH": str(image_path),
        "print": lambda *a: None,
    }
    exec(compile(SEED_CODE, "seed_demo.py", "exec"), scope)
    seed_answer = scope["output"]

    model, tokenizer, processor = load_ziya(tiny.visual_dir, tiny.llm_dir)
    ours = model.chat(
        tokenizer,
        processor([Image.open(image_path)]),
        "这是什么游戏",
        [],
        [],
        max_new_tokens=128,
        top_p=0.1,
        temperature=0.7,
        repetition_penalty=1.18,
    )
    assert isinstance(seed_answer, str) and seed_answer
    assert seed_answer == ours
    # The seed's objects are transformers' own classes, and the model is this package's class.
    assert type(scope["tokenizer"]).__name__ == "LlamaTokenizer"
    assert type(scope["model"]) is type(model)


def test_seed_generate_config_keys_reach_generate(setup):
    tiny, image_path = setup
    model, tokenizer, processor = load_ziya(tiny.visual_dir, tiny.llm_dir)
    pixels = processor([Image.open(image_path)])
    greedy = model.chat(tokenizer, pixels, "What is in the picture?", max_new_tokens=12)
    assert greedy == model.chat(
        tokenizer, pixels, "What is in the picture?", max_new_tokens=12, num_beams=1
    )
    beams = model.chat(
        tokenizer,
        pixels,
        "What is in the picture?",
        max_new_tokens=12,
        num_beams=3,
        length_penalty=1.0,
        no_repeat_ngram_size=3,
    )
    assert isinstance(beams, str) and beams
    # A GenerationConfig key that is not one of GenerationSettings' fields is forwarded too.
    assert model.chat(
        tokenizer,
        pixels,
        "What is in the picture?",
        max_new_tokens=12,
        num_beams=3,
        early_stopping=True,
    )
    with pytest.raises(ValueError, match="did you mean 'num_beams'"):
        model.chat(tokenizer, pixels, "What is in the picture?", num_beam=3)
    with pytest.raises(ValueError, match="set by ziya_model"):
        model.chat(tokenizer, pixels, "What is in the picture?", pad_token_id=5)


def test_defaults_match_the_release():
    settings = GenerationSettings()
    assert settings.repetition_penalty == 1.18  # the public demo's value
    assert (settings.max_new_tokens, settings.top_p, settings.temperature) == (128, 0.1, 0.7)
    assert settings.do_sample is False and settings.num_beams == 1
