"""A model loader for fault tests: counts every model call, and can crash its worker on cue.

`pipeline.builder.run(job, loader=...)` accepts any picklable zero-arg callable returning
`(model, tokenizer, processor)`. `CountingLoader` wraps the real one (`ModelLoader(job)`) and
patches the loaded model instance, so the real tiny model still answers every question:

    calls = tmp_path / "calls.jsonl"
    run(job, loader=CountingLoader(ModelLoader(job), str(calls)))
    assert answered_rows(calls) == 20          # prompts the model answered, over all actors

Faults it can inject, each by killing the actor process with `os._exit(1)` (what a segfault,
a CUDA abort or the OOM killer look like to Ray):
- `crash_on_call=N` with `crash_marker=PATH`: the Nth `answer_batch` call of an actor exits,
  only if PATH does not exist yet (it is created first), so the crash happens once per test;
- `poison=True`: any batch holding a uniform (single-colour) image exits, every time: a row that
  crashes its worker on every retry.
- `hang=True`: encoding any batch holding a uniform image never returns, every time: a row that
  hangs its model call (a stuck kernel); logged as `{"event": "hang", "pid", "t"}` first.
`delay_s` slows every call down, so a test can kill a run in the middle.

Log lines are JSON: one per model load, `{"event": "load", "pid", "t"}`, and one per completed
`answer_batch` call (a call that crashed is not logged), `{"event": "answer", "pid", "t",
"rows": prompts answered, "images": images encoded for the batch}`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Largest per-channel standard deviation (in normalized pixel units) of a "uniform" image: a
# JPEG of one colour decodes to within a step or two of it, a photograph is far above this.
UNIFORM_STD = 0.05


@dataclass(frozen=True)
class CountingLoader:
    """Loads through `base`, then records each model call in `log` (a local file path)."""

    base: Callable[[], tuple[Any, Any, Any]]
    log: str
    crash_on_call: int | None = None
    crash_marker: str | None = None
    poison: bool = False
    hang: bool = False
    delay_s: float = 0.0

    def __call__(self) -> tuple[Any, Any, Any]:
        model, tokenizer, processor = self.base()
        self._write({"event": "load"})
        answer_batch, encode_images = model.answer_batch, model.encode_images
        state = {"calls": 0, "images": 0}

        def counted_encode(pixel_values):
            if self.poison and _has_uniform_image(pixel_values):
                os._exit(1)
            if self.hang and _has_uniform_image(pixel_values):
                self._write({"event": "hang"})
                threading.Event().wait()  # forever: only ending the process gets out of here
            state["images"] = int(pixel_values.shape[0])
            return encode_images(pixel_values)

        def counted_answer(tokenizer, queries, image_embeds, **kwargs):
            state["calls"] += 1
            if state["calls"] == self.crash_on_call and _claim(self.crash_marker):
                os._exit(1)
            if self.delay_s:
                time.sleep(self.delay_s)
            answers = answer_batch(tokenizer, queries=queries, image_embeds=image_embeds, **kwargs)
            self._write({"event": "answer", "rows": len(queries), "images": state["images"]})
            return answers

        # Instance attributes shadow the class methods for this model object only.
        model.encode_images = counted_encode
        model.answer_batch = counted_answer
        return model, tokenizer, processor

    def _write(self, line: dict) -> None:
        line.update(pid=os.getpid(), t=round(time.time(), 3))
        # One short line per O_APPEND write: lines from several actors never interleave.
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


def _claim(marker: str | None) -> bool:
    """Create `marker` atomically; True only for the first caller (so a crash happens once)."""
    if marker is None:
        return False
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _has_uniform_image(pixel_values) -> bool:
    flat = pixel_values.float().flatten(2)  # [B, 3, S*S]
    return bool((flat.std(dim=2).amax(dim=1) < UNIFORM_STD).any())


def events(log: str | os.PathLike, event: str) -> list[dict]:
    """Logged lines of one kind ("load" or "answer"), in order; empty when there is no log."""
    path = Path(log)
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [line for line in lines if line["event"] == event]


def calls(log: str | os.PathLike) -> list[dict]:
    """Every completed model call (empty when the model was never called)."""
    return events(log, "answer")


def loads(log: str | os.PathLike) -> int:
    """How many times an actor loaded the model (restarted actors load it again)."""
    return len(events(log, "load"))


def answered_rows(log: str | os.PathLike) -> int:
    """Prompts the model answered (one per output row of a caption job)."""
    return sum(c["rows"] for c in calls(log))


def pids(log: str | os.PathLike) -> set[int]:
    """The actor processes that answered."""
    return {c["pid"] for c in calls(log)}
