"""`ziya-batch playground --engine vllm` answers as the transformers playground does: the Chat
tab (two turns per photograph; beam search refused with a message) and the Job tab's trial
(tiny checkpoint, fp32, exact preprocessing, greedy)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.playground import GENERATION_FIELDS, Chat, open_model
from jobs.trial import Edits, JobTrial
from ziya_model import GenerationSettings

pytestmark = pytest.mark.slow

PHOTOS = ("astronaut", "chelsea")
QUESTIONS = ("Describe this image in one sentence.", "And the colour?")
SETTINGS = {"max_new_tokens": 8, "repetition_penalty": 1.18}


def _controls(**settings) -> list:
    values = GenerationSettings(**settings).model_dump()
    return [values[k] for k in GENERATION_FIELDS]


def _answers(loaded, photo_dir, job: JobTrial) -> tuple[list[str], dict[str, str]]:
    chat, answers = Chat(loaded), []
    for name in PHOTOS:
        state, history = chat.set_image((photo_dir / f"{name}.jpg").read_bytes(), name)[3], []
        for question in QUESTIONS:
            _, history, state, stats = chat.ask(question, state, history, *_controls(**SETTINGS))
            assert "tokens in" in stats, stats
        answers += [m["content"] for m in history if m["role"] == "assistant"]
    rows = job.run(job.sample(8, 0), loaded, Edits(generation=SETTINGS))
    assert [r["status"] for r in rows] == ["ok"] * len(PHOTOS)
    return answers, {r["id"]: r["answer"] for r in rows}


def test_playground_on_vllm_answers_as_on_transformers(tmp_path, tiny_checkpoint, photo_dir):
    rows = [{"id": name, "image": str(photo_dir / f"{name}.jpg")} for name in PHOTOS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    job = {
        "input": {"uri": str(tmp_path / "manifest.parquet")},
        "output": {"uri": str(tmp_path / "out")},
        "model": {"visual": str(tiny_checkpoint.visual_dir), "llm": str(tiny_checkpoint.llm_dir)},
        "task": {"kind": "caption", "caption_prompt": QUESTIONS[0]},
        "limits": {"allowed_locations": [f"{photo_dir}/"]},
        "preprocess": {"mode": "exact"},
    }
    visual, llm = tiny_checkpoint.visual_dir, tiny_checkpoint.llm_dir
    reference = _answers(open_model(visual, llm, "fp32", "cpu"), photo_dir, JobTrial(job, "t"))

    loaded = open_model(visual, llm, "fp32", engine="vllm")
    try:
        assert loaded.engine == "vllm"
        chat_answers, trial_answers = _answers(loaded, photo_dir, JobTrial(job, "t"))
        assert (chat_answers, trial_answers) == reference
        assert len(chat_answers) == len(PHOTOS) * len(QUESTIONS)
        # Beam search is refused with a message, the conversation unchanged.
        chat = Chat(loaded)
        state = chat.set_image((photo_dir / "chelsea.jpg").read_bytes(), "chelsea")[3]
        _, history, _, note = chat.ask("Why?", state, [], *_controls(num_beams=2))
        assert history == [] and "no beam search" in note
    finally:
        loaded.model.engine.close()
