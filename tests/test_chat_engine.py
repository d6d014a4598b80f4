"""`ziya-chat --engine`: refused with a clear message where vLLM is not installed (the main
environment); the vLLM engine's chat itself is tested in tests/vllm/test_vllm_chat.py."""

from __future__ import annotations

import importlib.util

import pytest

from ziya_model.chat_cli import main


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_engine_without_vllm_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--tiny", "--engine", "vllm"])
    assert exit_.value.code == 2
    assert "vLLM is not installed" in capsys.readouterr().err


def test_unknown_engine_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--tiny", "--engine", "sglang"])
    assert "invalid choice" in capsys.readouterr().err
