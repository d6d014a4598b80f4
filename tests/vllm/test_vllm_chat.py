"""`ziya-chat --engine vllm` answers as `--engine transformers` does (tiny checkpoint, fp32,
greedy, two turns of history on one image, then a new image)."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from skimage import data

from ziya_model.chat_cli import main

pytestmark = pytest.mark.slow


def test_chat_on_vllm_matches_transformers(tmp_path):
    paths = []
    for name in ("astronaut", "chelsea"):
        paths.append(tmp_path / f"{name}.jpg")
        Image.fromarray(getattr(data, name)()).save(paths[-1], quality=90)
    lines = [str(paths[0]), "What is in the picture?", "这张图片里有什么？"]
    lines += [f"/image {paths[1]}", "Describe it.", "/quit"]
    script = "\n".join(lines)
    transcripts = {}
    for engine in ("transformers", "vllm"):
        out = io.StringIO()
        argv = ["--tiny", "--dtype", "fp32", "--max-new-tokens", "8", "--engine", engine]
        assert main(argv, stdin=io.StringIO(script + "\n"), out=out) == 0
        transcripts[engine] = [line for line in out.getvalue().splitlines() if "bot> " in line]
    assert len(transcripts["vllm"]) == 3
    assert transcripts["vllm"] == transcripts["transformers"]
    with pytest.raises(SystemExit):
        main(["--tiny", "--engine", "vllm", "--num-beams", "2"])
