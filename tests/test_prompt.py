"""Golden segments for the Ziya-Visual prompt (`ziya_model.prompt.build_prompt`)."""

import pytest

from ziya_model import PromptLayout, build_prompt
from ziya_model.prompt import BOS, EOS, IMAGE, LEGACY_LAYOUT, candidate_layouts, prompt_text

ROLES = {"human_name": "<human>", "assistant_name": "<bot>", "prompt_prefix": ""}


def test_caption_prompt():
    assert build_prompt("Describe the image in detail.", **ROLES) == [
        IMAGE,
        BOS,
        "<human>:Describe the image in detail.\n<bot>:",
    ]


def test_single_question_vqa():
    assert build_prompt("How many cats are there?", (), (), **ROLES) == [
        IMAGE,
        BOS,
        "<human>:How many cats are there?\n<bot>:",
    ]


def test_multi_turn_history_is_chronological_with_eos_after_answers():
    segments = build_prompt(
        "And the sofa?",
        ["What animal is this?", "What color is it?"],
        ["A cat.", "Orange."],
        **ROLES,
    )
    assert segments == [
        IMAGE,
        BOS,
        "<human>:What animal is this?\n<bot>:A cat.",
        EOS,
        "<human>:What color is it?\n<bot>:Orange.",
        EOS,
        "<human>:And the sofa?\n<bot>:",
    ]


def test_legacy_layout_is_the_former_format():
    """`[bos prefix | image | turns]`, newline after each answer: this project's layout before
    the layout became an option (the old golden string, unchanged)."""
    segments = build_prompt(
        "And the sofa?",
        ["What animal is this?", "What color is it?"],
        ["A cat.", "Orange."],
        **ROLES,
        layout=LEGACY_LAYOUT,
    )
    assert segments == [
        BOS,
        IMAGE,
        "<human>:What animal is this?\n<bot>:A cat.\n"
        "<human>:What color is it?\n<bot>:Orange.\n"
        "<human>:And the sofa?\n<bot>:",
    ]


def test_newest_first_history():
    layout = PromptLayout(history_order="newest_first", after_answer="newline")
    segments = build_prompt("q3", ["q1", "q2"], ["a1", "a2"], **ROLES, layout=layout)
    assert segments[-1] == "<human>:q2\n<bot>:a2\n<human>:q1\n<bot>:a1\n<human>:q3\n<bot>:"


def test_chinese_text_and_custom_roles_and_prefix():
    segments = build_prompt(
        "图中有几个人？",
        ["这是哪里？"],
        ["一个公园。"],
        human_name="<用户>",
        assistant_name="<助手>",
        prompt_prefix="请根据图片回答。",
        layout=LEGACY_LAYOUT,
    )
    assert segments == [
        BOS,
        "请根据图片回答。",
        IMAGE,
        "<用户>:这是哪里？\n<助手>:一个公园。\n<用户>:图中有几个人？\n<助手>:",
    ]
    default = build_prompt(
        "图中有几个人？",
        human_name="<用户>",
        assistant_name="<助手>",
        prompt_prefix="请根据图片回答。",
    )
    assert prompt_text(default) == "<image><s>请根据图片回答。<用户>:图中有几个人？\n<助手>:"


def test_candidate_layouts_are_all_eight_default_first():
    layouts = list(candidate_layouts())
    assert len(set(layouts)) == 8 and layouts[0] == PromptLayout()


def test_unknown_layout_values_are_refused():
    with pytest.raises(ValueError, match="image_position"):
        PromptLayout(image_position="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown prompt_layout keys"):
        PromptLayout.from_dict({"image_pos": "before_bos"})


def test_history_lengths_must_match():
    with pytest.raises(ValueError, match="one answer per query"):
        build_prompt("q", ["a", "b"], ["only one"], **ROLES)


def test_roles_are_keyword_only():
    with pytest.raises(TypeError):
        build_prompt("q", (), (), "<human>", "<bot>", "")  # type: ignore[misc]
