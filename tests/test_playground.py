"""The playground without a browser: its answers are chat()'s and the pipeline's; its edits, saved
job files and `--set` lines are validated by the job config code; it serves no other files.

    python -m pytest tests/test_playground.py -q

The browser tests (tests/test_playground_browser.py) drive the same app through Chromium.
"""

from __future__ import annotations

import contextlib
import itertools
import shlex
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.trial import Edits, JobTrial, LoadedModel
from pipeline.config import JobConfigError, apply_overrides, parse_job
from ziya_model import vllm

QUESTION = "Describe this image in one sentence."
FOLLOW_UP = "And the colour?"
SETTINGS = {"max_new_tokens": 8, "repetition_penalty": 1.18}
PHOTOS = ("astronaut", "coffee", "chelsea")


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint) -> LoadedModel:
    from ziya_model import load_ziya

    model, tokenizer, processor = load_ziya(tiny_checkpoint.visual_dir, tiny_checkpoint.llm_dir)
    return LoadedModel(model, tokenizer, processor, "tiny",
                       str(tiny_checkpoint.visual_dir), str(tiny_checkpoint.llm_dir))  # fmt: skip


def _job_data(tmp_path: Path, photo_dir: Path, tiny, mode: str) -> dict:
    rows = [{"id": name, "image": str(photo_dir / f"{name}.jpg")} for name in PHOTOS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    return {
        "input": {"uri": str(tmp_path / "manifest.parquet")},
        "output": {"uri": str(tmp_path / f"out-{mode}")},
        "model": {"visual": str(tiny.visual_dir), "llm": str(tiny.llm_dir)},
        "task": {"kind": "caption", "caption_prompt": "a prompt the edit replaces"},
        "generation": {"max_new_tokens": 32},
        "limits": {"allowed_locations": [f"{photo_dir}/"]},
        "preprocess": {"mode": mode},
    }


def _chat_controls(settings: dict) -> list:
    from jobs.playground import GENERATION_FIELDS
    from ziya_model import GenerationSettings

    values = GenerationSettings(**settings).model_dump()
    return [values[k] for k in GENERATION_FIELDS]


def test_answers_equal_chat_and_a_pipeline_run(
    tmp_path: Path, loaded: LoadedModel, photo_dir: Path, tiny_checkpoint, ray_cluster
):
    pytest.importorskip("gradio")
    from jobs.playground import Chat
    from pipeline.builder import run
    from pipeline.output.layout import read_output
    from ziya_model.processing import decode_image

    # Chat tab: two turns per photograph; chat() with the same image, history and settings.
    chat = Chat(loaded)
    shown: dict[str, str] = {}
    for name in PHOTOS:
        data = (photo_dir / f"{name}.jpg").read_bytes()
        state = chat.set_image(data, name)[3]
        history: list = []
        for question in (QUESTION, FOLLOW_UP):
            _, history, state, stats = chat.ask(question, state, history, *_chat_controls(SETTINGS))
            assert "tokens in" in stats
        answers = [m["content"] for m in history if m["role"] == "assistant"]
        pixels = loaded.processor([decode_image(data)])
        first = loaded.model.chat(loaded.tokenizer, pixels, QUESTION, [], [], **SETTINGS)
        second = loaded.model.chat(
            loaded.tokenizer, pixels, FOLLOW_UP, [QUESTION], [first], **SETTINGS
        )
        assert answers == [first, second]
        shown[name] = first

    # Job tab, exact preprocessing (the chat's): the same answers as chat().
    edits = Edits(caption_prompt=QUESTION, generation=SETTINGS)
    exact = JobTrial(_job_data(tmp_path, photo_dir, tiny_checkpoint, "exact"), "exact.yaml")
    rows = exact.run(exact.sample(8, 0), loaded, edits)
    assert [r["status"] for r in rows] == ["ok"] * len(PHOTOS)
    assert {r["id"]: r["answer"] for r in rows} == shown
    assert all(r["question"] == QUESTION and r["thumbnail"] for r in rows)

    # Job tab, the default fast preprocessing: what `ziya-batch run` writes for the saved job.
    fast = JobTrial(_job_data(tmp_path, photo_dir, tiny_checkpoint, "fast"), "fast.yaml")
    trial_rows = fast.run(fast.sample(8, 0), loaded, edits)
    saved = tmp_path / "saved.yaml"
    saved.write_text(fast.saved_yaml(edits), encoding="utf-8")
    from pipeline.config import load_job

    summary = run(load_job(saved))
    assert summary.rows_out == len(PHOTOS)
    written = read_output(str(tmp_path / "out-fast")).to_pylist()
    assert {r["id"]: (r["question"], r["answer"], r["num_tokens"]) for r in written} == {
        r["id"]: (r["question"], r["answer"], r["num_tokens"]) for r in trial_rows
    }
    for w in written:
        t = next(r for r in trial_rows if r["id"] == w["id"])
        assert w["mean_logprob"] == pytest.approx(t["mean_logprob"], abs=1e-5)


def test_edits_are_validated_and_saved_as_job_file_or_overrides(tmp_path, tiny_checkpoint):
    data = {
        "input": {"uri": str(tmp_path / "m.parquet")},
        "output": {"uri": str(tmp_path / "out")},
        "model": {"visual": "/models/v", "llm": "/models/l"},
        "task": {"kind": "vqa", "questions": ["What is it?"]},
        "generation": {"max_new_tokens": 16, "num_beams": 3},
    }
    text = "# a comment\n" + yaml.safe_dump(data)
    trial = JobTrial.from_text(text, "labels.yaml")
    questions = ["What is it?", "Is it 'outdoors': yes or no?"]  # YAML-special characters
    edits = Edits(questions=questions, generation={"num_beams": 1, "max_new_tokens": 16})
    assert trial.changes(edits) == {"task.questions": questions, "generation.num_beams": 1}
    saved = yaml.safe_load(trial.saved_yaml(edits))
    assert saved == {**data, "task": {**data["task"], "questions": questions},
                     "generation": {"max_new_tokens": 16, "num_beams": 1}}  # fmt: skip
    # The --set lines, as a shell splits them, turn the original into the same job.
    words = shlex.split(" ".join(trial.overrides(edits)))
    overrides = [w for prev, w in itertools.pairwise(words) if prev == "--set"]
    assert parse_job(apply_overrides(yaml.safe_load(text), overrides)) == trial.edited_job(edits)
    # Nothing edited: nothing to set.
    assert trial.overrides(Edits(questions=["What is it?"])) == []
    # Values the job config refuses are refused here, with the key.
    with pytest.raises(JobConfigError, match="max_new_tokens"):
        trial.saved_yaml(Edits(generation={"max_new_tokens": 0}))
    with pytest.raises(JobConfigError, match="unknown generation option"):
        trial.changes(Edits(generation={"max_new_tokns": 3}))
    with pytest.raises(JobConfigError, match="top level must be a mapping"):
        JobTrial.from_text("- a list", "x.yaml")


def test_chat_refuses_broken_images_and_bombs_with_a_message(loaded, photo_dir):
    pytest.importorskip("gradio")
    from jobs.playground import Chat
    from tests.support.hostile import png_bomb, truncated

    chat = Chat(loaded)
    photo = (photo_dir / "coffee.jpg").read_bytes()
    cases = {
        "bomb.png": (png_bomb(9000, 9000), "image too large: 9000x9000"),
        "cut.jpg": (truncated(photo), "cannot decode"),
        "notes.txt": (b"not an image at all", "not an image"),
        "empty.jpg": (b"", "empty image"),
    }
    for label, (data, message) in cases.items():
        preview, note, history, state = chat.set_image(data, label)
        assert preview is None and history == [] and state["pixels"] is None
        assert f"cannot use {label}" in note and message in note, note
    # Asking without an image says so instead of answering.
    _, history, _, stats = chat.ask("What is it?", state, [], *_chat_controls(SETTINGS))
    assert history == [] and "upload or pick an image first" in stats


def test_job_files_only_from_the_list(loaded):
    pytest.importorskip("gradio")
    from jobs.playground import JobTab, packaged_job_files

    tab = JobTab(loaded, packaged_job_files())
    for name in ("/etc/passwd", "../pyproject.toml", "caption_dataset"):
        state, note = tab.open_named(name)[:2]
        assert state["trial"] is None and "no job file" in note
    state, note = tab.open_named("caption_dataset.yaml")[:2]
    assert state["trial"].job.task.kind == "caption" and "caption job" in note


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serves_no_files_but_its_own_and_asks_for_a_login(tmp_path, loaded):
    pytest.importorskip("gradio")
    import http.cookiejar
    import urllib.parse

    from jobs.playground import MAX_UPLOAD_BYTES, build_app

    secret = tmp_path / "secret.txt"
    secret.write_text("not for the browser")
    app = build_app(loaded, "tiny", {})
    port = _free_port()
    app.queue(default_concurrency_limit=1)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               ssr_mode=False, auth=[("ann", "pw")], max_file_size=MAX_UPLOAD_BYTES)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )

    def status(path: str, data: bytes | None = None) -> int:
        try:
            with opener.open(f"{base}{path}", data=data, timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code

    try:
        assert status("/config") == 401  # nothing but the login page without a login
        assert (
            status("/login", urllib.parse.urlencode({"username": "ann", "password": "no"}).encode())
            >= 400
        )
        assert (
            status("/login", urllib.parse.urlencode({"username": "ann", "password": "pw"}).encode())
            == 200
        )
        assert status("/config") == 200
        root = Path(__file__).resolve().parent.parent
        for path in (secret, root / "pyproject.toml", Path("/etc/passwd")):
            assert status(f"/gradio_api/file={path}") in (403, 404), path
    finally:
        with contextlib.suppress(Exception):
            app.close()


def test_cli_binds_loopback_by_default_and_loads_the_tiny_model():
    from jobs.cli import build_parser, main
    from jobs.playground import load_model

    args = build_parser().parse_args(["playground"])
    assert args.host == "127.0.0.1" and args.visual is None and args.auth_file is None
    with pytest.raises(SystemExit, match="--visual with --llm"):
        main(["playground", "--visual", "/models/v"])
    loaded, line, questions = load_model(build_parser().parse_args(["playground", "--tiny"]))
    assert "random-weight" in line and questions == []
    assert loaded.processor.image_size == loaded.model.config.vision_config.image_size


@pytest.mark.skipif(vllm.installed(), reason="vLLM is installed here")
def test_engine_vllm_without_vllm_says_so():
    from jobs.cli import main

    with pytest.raises(SystemExit, match="--engine vllm: vLLM is not installed"):
        main(["playground", "--tiny", "--engine", "vllm"])
