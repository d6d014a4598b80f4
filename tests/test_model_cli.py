"""`ziya-chat` driven through main() with a scripted stdin, on the tiny checkpoint."""

import io

import pytest
from PIL import Image
from skimage import data

from ziya_model import load_ziya, write_tiny_checkpoint
from ziya_model.chat_cli import main


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-photos")
    paths = []
    for name in ("astronaut", "chelsea"):
        path = folder / f"{name}.jpg"
        Image.fromarray(getattr(data, name)()).save(path, quality=90)
        paths.append(path)
    return paths


def test_chat_keeps_history_per_image_and_switches(tmp_path, photos):
    first, second = photos
    script = "\n".join(
        [
            str(tmp_path / "missing.jpg"),  # a bad path is reported, then asked again
            str(first),
            "What is in the picture?",
            "这张图片里有什么？",
            f"/image {second}",
            "What is in the picture?",
            "/quit",
            "never read",
        ]
    )
    out = io.StringIO()
    rc = main(["--tiny", "--max-new-tokens", "8"], stdin=io.StringIO(script + "\n"), out=out)
    assert rc == 0
    text = out.getvalue()

    # The same answers, computed directly with chat() on the same tiny checkpoint (seed 0).
    tiny = write_tiny_checkpoint(tmp_path / "tiny")
    model, tokenizer, processor = load_ziya(tiny.visual_dir, tiny.llm_dir)

    def answer(path, query, queries, answers):
        pixels = processor([Image.open(path)])
        return model.chat(tokenizer, pixels, query, queries, answers, max_new_tokens=8)

    a1 = answer(first, "What is in the picture?", [], [])
    a2 = answer(first, "这张图片里有什么？", ["What is in the picture?"], [a1])
    a3 = answer(second, "What is in the picture?", [], [])  # history cleared by /image
    a2_without_history = answer(first, "这张图片里有什么？", [], [])
    assert a2 != a2_without_history  # so the next assertion really checks the history

    assert "tiny random-weight model" in text
    assert "cannot use" in text and "missing.jpg" in text
    assert text.count("bot> ") == 3
    positions = [text.index(f"bot> {a}\n") for a in (a1, a2, a3)]
    assert positions == sorted(positions)
    assert "never read" not in text


def test_chat_ends_cleanly_at_end_of_input(photos):
    out = io.StringIO()
    rc = main(["--tiny"], stdin=io.StringIO(f"{photos[0]}\n/reset\n/what\n"), out=out)
    assert rc == 0
    assert "history cleared" in out.getvalue()
    assert "unknown command /what" in out.getvalue()


def test_visual_needs_llm():
    with pytest.raises(SystemExit):
        main(["--visual", "somewhere"])
