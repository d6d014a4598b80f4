"""Golden strings for the Ziya-Visual prompt (`ziya_model.prompt.build_prompt`)."""

import pytest

from ziya_model import build_prompt

ROLES = {"human_name": "<human>", "assistant_name": "<bot>", "prompt_prefix": ""}


def test_caption_prompt():
    assert build_prompt("Describe the image in detail.", **ROLES) == (
        "",
        "<human>:Describe the image in detail.\n<bot>:",
    )


def test_single_question_vqa():
    assert build_prompt("How many cats are there?", (), (), **ROLES) == (
        "",
        "<human>:How many cats are there?\n<bot>:",
    )


def test_multi_turn_history_is_chronological():
    before, after = build_prompt(
        "And the sofa?",
        ["What animal is this?", "What color is it?"],
        ["A cat.", "Orange."],
        **ROLES,
    )
    assert before == ""
    assert after == (
        "<human>:What animal is this?\n<bot>:A cat.\n"
        "<human>:What color is it?\n<bot>:Orange.\n"
        "<human>:And the sofa?\n<bot>:"
    )


def test_chinese_text_and_custom_roles_and_prefix():
    before, after = build_prompt(
        "图中有几个人？",
        ["这是哪里？"],
        ["一个公园。"],
        human_name="<用户>",
        assistant_name="<助手>",
        prompt_prefix="请根据图片回答。",
    )
    assert before == "请根据图片回答。"
    assert after == "<用户>:这是哪里？\n<助手>:一个公园。\n<用户>:图中有几个人？\n<助手>:"


def test_history_lengths_must_match():
    with pytest.raises(ValueError, match="one answer per query"):
        build_prompt("q", ["a", "b"], ["only one"], **ROLES)


def test_roles_are_keyword_only():
    with pytest.raises(TypeError):
        build_prompt("q", (), (), "<human>", "<bot>", "")  # type: ignore[misc]
