"""The web playground (`ziya-batch playground`) driven in a real headless Chromium.

    python -m pytest tests/test_playground_browser.py -q

One playground process on the tiny checkpoint (started through the CLI, bound to 127.0.0.1),
one Chromium session through chromedriver (tests/support/browser.py). Chat: upload a
photograph, ask, see the answer; ask again (two turns); pick another photograph and see the
history cleared; a decompression-bomb upload is refused with a message. Job: upload a job file
whose manifest is on a real S3 server (moto on 127.0.0.1), run the sample (a row outside the
allowed locations is refused as invalid_path, a bomb row is too_large, as in the job), edit the
prompt, rerun (the previous answers beside the new ones), save the job file: it validates with
`load_job` and holds the edit, and the `--set` lines give the same job. Screenshots of both
tabs go to test-artifacts/ (docs/playground-*.png are copies of them). Skipped only where
chromium / chromedriver or gradio are not installed (.ci/run installs them).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import DEFAULT_CAPTION_PROMPT
from tests.support.browser import Browser, chromium_session, missing_browser

try:
    import gradio  # noqa: F401

    _NO_GRADIO = None
except ImportError:
    _NO_GRADIO = "gradio not installed (pip install 'ziya-batch[playground]')"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(missing_browser() is not None, reason=str(missing_browser())),
    pytest.mark.skipif(_NO_GRADIO is not None, reason=str(_NO_GRADIO)),
]
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
BUCKET = "playground"
# The oracle's questions (ziya_model.oracle): where the oracle exists its answers are known.
PROMPT = DEFAULT_CAPTION_PROMPT
EDITED_PROMPT = "What is the main color of this picture?"
RECALL = "What did you just say?"
MESSAGES = "#chat-history [data-testid=user], #chat-history [data-testid=bot]"
MAX_TOKENS = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(b: Browser, script: str, what: str, timeout: float = 90, *args):
    """Poll `script` in the page until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        got = b.execute(script, *args)
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _text(b: Browser, elem_id: str) -> str:
    return b.execute(f"const e = document.getElementById('{elem_id}'); return e ? e.innerText : ''")


def _messages(b: Browser) -> list[tuple[str, str]]:
    return b.execute(
        f"return Array.from(document.querySelectorAll('{MESSAGES}'))"
        ".map(e => [e.dataset.testid, e.innerText])"
    )


def _upload(b: Browser, elem_id: str, path: Path) -> None:
    b.type(b.find(f"#{elem_id} input[type=file]"), str(path))


def _set_textbox(b: Browser, elem_id: str, text: str) -> None:
    box = b.find(f"#{elem_id} textarea")
    b.clear(box)
    b.type(box, text)


def _pick(b: Browser, elem_id: str, choice: str) -> None:
    """Choose an option of a gradio Dropdown as a person does: open it, click the option."""
    b.click(b.find(f"#{elem_id} input"))
    css = f"#{elem_id} li[role=option][aria-label='{choice}']"
    b.click(_wait(b, f'return document.querySelector("{css}")', f"option {choice}", 10))


def _open_accordions(b: Browser, label: str) -> None:
    """Click the visible accordions labelled `label` (opens them, or closes open ones)."""
    b.execute(
        "document.querySelectorAll('button.label-wrap').forEach(e => {"
        " if (e.innerText.includes(arguments[0]) && e.offsetParent) e.click(); })",
        label,
    )


def _set_slider(b: Browser, elem_id: str, value: int) -> None:
    """Type a value into a gradio Slider's number box (what a person does for an exact value)."""
    box = _wait(b, f"return document.querySelector('#{elem_id} input[type=number]')", elem_id, 10)
    b.clear(box)
    b.type(box, f"{value}\ue004")  # then Tab: the slider takes the value on change
    _wait(b, f"return document.querySelector('#{elem_id} input[type=range]').value == '{value}'",
          f"{elem_id} = {value}", 10)  # fmt: skip


def _screenshot(b: Browser, name: str) -> Path:
    b.set_window(1280, 1000)
    height = b.execute("return document.documentElement.scrollHeight")
    b.set_window(1280, min(int(height) + 140, 2400))
    path = b.screenshot(ARTIFACTS / name)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


@pytest.fixture(scope="module")
def s3_job(tmp_path_factory, moto_endpoint, photo_dir) -> Path:
    """A caption job file whose manifest and images are on moto: four photographs, a
    decompression bomb, and a row in another bucket (outside the allowed locations)."""
    from tests.support import s3
    from tests.support.hostile import png_bomb

    root = tmp_path_factory.mktemp("playground-job")
    s3.create_bucket(moto_endpoint, BUCKET)
    s3.create_bucket(moto_endpoint, "elsewhere")
    rows = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        s3.upload_file(moto_endpoint, photo_dir / f"{name}.jpg", BUCKET, f"images/{name}.jpg")
        rows.append({"id": name, "image": f"s3://{BUCKET}/images/{name}.jpg", "note": "p"})
    s3.put_bytes(moto_endpoint, BUCKET, "images/bomb.png", png_bomb(9000, 9000))
    rows.append({"id": "bomb", "image": f"s3://{BUCKET}/images/bomb.png", "note": "b"})
    s3.put_bytes(moto_endpoint, "elsewhere", "x.jpg", (photo_dir / "coffee.jpg").read_bytes())
    rows.append({"id": "outside", "image": "s3://elsewhere/x.jpg", "note": "o"})
    manifest = root / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    s3.upload_file(moto_endpoint, manifest, BUCKET, "manifests/photos.parquet")
    return root


def _job_file(root: Path, endpoint: str, tiny) -> Path:
    text = f"""# caption job over S3 (moto)
name: playground-test
input:
  uri: s3://{BUCKET}/manifests/photos.parquet
output:
  uri: s3://{BUCKET}/captions/
model:
  visual: {tiny.visual_dir}
  llm: {tiny.llm_dir}
task:
  kind: caption
  caption_prompt: "{PROMPT}"
generation:
  max_new_tokens: {MAX_TOKENS}
storage:
  endpoint_url: {endpoint}
"""
    path = root / "caption_s3.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def checkpoint(request, tiny_checkpoint):
    """(checkpoint, known answers): the oracle where it exists (answers that read as sentences,
    and are known), else the random-weight tiny checkpoint (no answer is known)."""
    try:
        from ziya_model.oracle import KNOWN_ANSWERS

        return request.getfixturevalue("oracle_checkpoint"), KNOWN_ANSWERS
    except (ImportError, pytest.FixtureLookupError):
        return tiny_checkpoint, None


@pytest.fixture(scope="module")
def playground(tmp_path_factory, checkpoint, moto_endpoint):
    """`ziya-batch playground` on a tiny checkpoint, in its own process; yields its URL."""
    tiny = checkpoint[0]
    port = _free_port()
    log_path = tmp_path_factory.mktemp("playground") / "playground.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "jobs.cli", "playground", "--port", str(port),
           "--visual", str(tiny.visual_dir), "--llm", str(tiny.llm_dir),
           "--device", "cpu", "--dtype", "fp32"]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"playground did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_chat_tab_in_chromium(tmp_path: Path, playground: str, photo_dir: Path, checkpoint):
    from tests.support.hostile import png_bomb

    known = checkpoint[1]

    with chromium_session(tmp_path) as b:
        b.get(playground)
        _wait(b, "return document.querySelector('#chat-upload input[type=file]')", "the page")
        _open_accordions(b, "Generation settings")
        _set_slider(b, "chat-max_new_tokens", MAX_TOKENS)

        # Upload a photograph, ask, see the answer and its tokens and time.
        _upload(b, "chat-upload", photo_dir / "coffee.jpg")
        _wait(b, "return document.getElementById('chat-image-note').innerText.includes('600x400')",
              "the image to be taken")  # fmt: skip
        assert b.execute("return document.querySelector('#chat-image img') !== null")
        _set_textbox(b, "chat-question", EDITED_PROMPT)
        b.click(b.find("#chat-ask"))
        _wait(b, "return document.querySelectorAll('#chat-history [data-testid=bot]').length == 1",
              "the first answer")  # fmt: skip
        first = _messages(b)
        assert first[0] == ["user", EDITED_PROMPT] and first[1][0] == "bot"
        assert first[1][1].strip(), "the answer is empty"
        assert "tokens in" in _text(b, "chat-stats")

        # A second turn keeps the history (the oracle answers it with its last answer).
        _set_textbox(b, "chat-question", RECALL)
        b.click(b.find("#chat-ask"))
        _wait(b, "return document.querySelectorAll('#chat-history [data-testid=bot]').length == 2",
              "the second answer")  # fmt: skip
        turns = _messages(b)
        assert [m[0] for m in turns] == ["user", "bot", "user", "bot"]
        assert "turn 2" in _text(b, "chat-stats")
        if known:
            colour = known["coffee"][EDITED_PROMPT]
            assert [turns[1][1], turns[3][1]] == [colour, colour]

        # Another image clears the history.
        _pick(b, "chat-photo", "astronaut")
        _wait(b, "return document.getElementById('chat-image-note').innerText.includes('astronaut')",
              "the photograph to be taken")  # fmt: skip
        _wait(b, f"return document.querySelectorAll('{MESSAGES}').length == 0",
              "the history to be cleared")  # fmt: skip
        _set_textbox(b, "chat-question", PROMPT)
        b.click(b.find("#chat-ask"))
        _wait(b, "return document.querySelectorAll('#chat-history [data-testid=bot]').length == 1",
              "the answer about the new image")  # fmt: skip
        if known:
            assert _messages(b)[1][1] == known["astronaut"][PROMPT]
        _open_accordions(b, "Generation settings")  # closes it: a shorter screenshot
        _screenshot(b, "playground-chat.png")

        # A decompression bomb (2.6 MB of PNG declaring 2.7 G pixels) gets a clear message.
        bomb = tmp_path / "bomb.png"
        bomb.write_bytes(png_bomb(30000, 30000))
        b.execute("document.querySelector('#chat-upload button[aria-label=Clear]')?.click()")
        _upload(b, "chat-upload", bomb)
        note = _wait(b, "const t = document.getElementById('chat-image-note').innerText;"
                        "return t.includes('bomb.png') ? t : null", "the bomb's message")  # fmt: skip
        assert "cannot use bomb.png: image too large" in note, note
        assert _messages(b) == []  # nothing to chat about: history and image are gone
        _set_textbox(b, "chat-question", "Still there?")
        b.click(b.find("#chat-ask"))
        _wait(b, "return document.getElementById('chat-stats').innerText.includes('first')",
              "the no-image message")  # fmt: skip
        assert _messages(b) == []


def test_job_tab_in_chromium(tmp_path: Path, playground: str, s3_job: Path, moto_endpoint,
                             checkpoint):  # fmt: skip
    from pipeline.config import apply_overrides, load_job, parse_job

    tiny, known = checkpoint
    job_path = _job_file(s3_job, moto_endpoint, tiny)
    with chromium_session(tmp_path) as b:
        b.get(playground)
        b.click(_wait(b, "return document.querySelector('button[role=tab][data-tab-id=job]')",
                      "the Job tab"))  # fmt: skip
        _wait(b, "return document.querySelector('#job-upload input[type=file]')", "the Job tab")
        _upload(b, "job-upload", job_path)
        note = _wait(b, "const t = document.getElementById('job-note').innerText;"
                        "return t.includes('caption job') ? t : null", "the job to load")  # fmt: skip
        assert f"s3://{BUCKET}/manifests/photos.parquet" in note and "the job's model" in note
        prompt = b.find("#job-prompt textarea")
        assert b.execute("return arguments[0].value", prompt) == PROMPT

        # Run the sample: all six rows (sample size 8), through the pipeline's stages.
        b.click(b.find("#job-run"))
        _wait(b, "return document.querySelectorAll('#job-results tr.result').length == 6",
              "the first run's answers")  # fmt: skip
        rows = _result_rows(b)
        by_id = {r["id"]: r for r in rows}
        assert sorted(by_id) == ["astronaut", "bomb", "chelsea", "coffee", "outside", "rocket"]
        assert by_id["outside"]["status"].startswith("invalid_path")
        assert by_id["bomb"]["status"].startswith("too_large")
        ok = [r for r in rows if r["status"] == "ok"]
        assert len(ok) == 4 and all(r["question"] == PROMPT and r["answer"] for r in ok)
        assert all(r["thumbnail"] for r in ok) and all(r["previous"] == "" for r in rows)
        assert "6 answers for 6 of 6 rows" in _text(b, "job-results")
        if known:
            assert {r["id"]: r["answer"] for r in ok} == {
                r["id"]: known[r["id"]][PROMPT] for r in ok
            }

        # Edit the prompt and a generation setting, rerun: the new question, with the previous
        # answers beside.
        _set_textbox(b, "job-prompt", EDITED_PROMPT)
        _open_accordions(b, "Generation settings")
        _set_slider(b, "job-num_beams", 2)
        b.click(b.find("#job-run"))
        _wait(b, "return Array.from(document.querySelectorAll('#job-results td.question'))"
                 ".some(td => td.innerText === arguments[0])", "the rerun", 90,
              EDITED_PROMPT)  # fmt: skip
        again = {r["id"]: r for r in _result_rows(b)}
        for r in ok:
            assert again[r["id"]]["question"] == EDITED_PROMPT
            assert again[r["id"]]["previous"] == r["answer"]
            if known:
                assert again[r["id"]]["answer"] == known[r["id"]][EDITED_PROMPT]

        # Save: the job file with the edits, valid for `ziya-batch run`; the --set lines agree.
        b.click(b.find("#job-save"))
        href = _wait(b, "const a = document.querySelector('#job-saved-file a[href]');"
                        "return a ? a.href : null", "the saved job file")  # fmt: skip
        with urllib.request.urlopen(href, timeout=10) as resp:
            saved_text = resp.read().decode()
        command = _wait(b, "return Array.from(document.querySelectorAll('#job-overrides .cm-line'))"
                           ".map(l => l.innerText).join('\\n')", "the --set lines")  # fmt: skip
        assert "2 field(s) changed" in _text(b, "job-saved-note")
        _screenshot(b, "playground-job.png")
    saved = tmp_path / "saved.yaml"
    saved.write_text(saved_text, encoding="utf-8")
    job, original = load_job(saved), load_job(job_path)
    assert job.task.caption_prompt == EDITED_PROMPT and job.generation.num_beams == 2
    assert job.generation.max_new_tokens == MAX_TOKENS  # the rest as written
    assert job.model_dump(exclude={"task", "generation"}) == original.model_dump(
        exclude={"task", "generation"}
    )
    # `ziya-batch run JOB.yaml --set ...`: the same job as the saved file.
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:3] == ["ziya-batch", "run", "JOB.yaml"]
    overrides = [w for prev, w in itertools.pairwise(words) if prev == "--set"]
    assert len(overrides) == 2
    data = yaml.safe_load(job_path.read_text(encoding="utf-8"))
    assert parse_job(apply_overrides(data, overrides)) == job


def _result_rows(b: Browser) -> list[dict]:
    return b.execute(
        "return Array.from(document.querySelectorAll('#job-results tr.result')).map(tr => {"
        " const td = tr.querySelectorAll('td');"
        " return {thumbnail: !!td[0].querySelector('img'), id: td[1].innerText.split('\\n')[0],"
        "  question: td[2].innerText, answer: td[3].innerText, previous: td[4].innerText,"
        "  status: td[5].innerText};"
        "})"
    )
