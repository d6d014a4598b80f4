"""A stand-in model for pipeline benchmarks: a fixed wait per batch, no CPU, a busy-time log.

    loader = StandInLoader(sleep_s=0.2, image_size=224, log_path="/tmp/busy.log")
    run(job, loader=loader)          # the real pipeline around a model that only sleeps
    busy = read_busy_log(log_path)   # [(pid, start, end, rows)] per model call

`StandInModel` has the surface `InferStage` uses (parameters, dtypes, `encode_images`,
`answer_batch`), so everything around the model (Ray Data, stages, batching, the driver's
commits) runs unchanged. It stands for a model on an accelerator: the work InferStage hands to
the device (normalizing pixels, encoding, generating) costs no host CPU here. `answer_batch` sleeps `sleep_s` per call, whatever the batch holds, so
a pool of N actors cannot exceed N x batch_size / sleep_s rows/s: that is the bound the pipeline
is measured against. Each call appends `pid start end rows` to `log_path` (one short O_APPEND
write, atomic across processes), from which the benchmarks compute actor busy time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from types import SimpleNamespace

# torch is imported where a stand-in model is made (the model actors), not with this module: the
# pipeline's feeder lanes unpickle the loader without loading a model, as with the real one.

LOADED = -1  # `rows` value of the log line an actor writes when its model is loaded


@dataclass(frozen=True)
class StandInAnswer:
    text: str
    num_tokens: int
    mean_logprob: float | None = None


class StandInModel:
    """Sleeps `sleep_s` per `answer_batch` call; encodes images to a zero-size tensor."""

    def __init__(self, sleep_s: float, log_path: str | None):
        import torch

        self.anchor = torch.zeros(1)
        self.vision_model = SimpleNamespace(dtype=torch.float32)
        self.language_model = SimpleNamespace(dtype=torch.float32)
        self.config = SimpleNamespace(num_query_tokens=32)
        self.sleep_s = sleep_s
        self.log_path = log_path

    def parameters(self):
        yield self.anchor  # InferStage reads the device from the first parameter

    def encode_images(self, pixel_values):
        import torch

        return torch.zeros(pixel_values.shape[0], 1, 1)

    def answer_batch(self, tokenizer, queries, image_embeds, image_index=None, **_):
        start = time.time()
        time.sleep(self.sleep_s)
        end = time.time()
        log_call(self.log_path, start, end, len(queries))
        return [StandInAnswer("stand-in answer", 1) for _ in queries]


def log_call(log_path: str | None, start: float, end: float, rows: int) -> None:
    if not log_path:
        return
    line = f"{os.getpid()} {start:.6f} {end:.6f} {rows}\n".encode()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_busy_log(log_path: str) -> list[tuple[int, float, float, int]]:
    """[(pid, start, end, rows)] for every stand-in call, in start order (rows = LOADED marks
    the moment an actor's model was loaded)."""
    if not os.path.exists(log_path):
        return []
    calls = []
    with open(log_path) as f:
        for line in f:
            pid, start, end, rows = line.split()
            calls.append((int(pid), float(start), float(end), int(rows)))
    return sorted(calls, key=lambda c: c[1])


@dataclass(frozen=True)
class StandInLoader:
    """Picklable zero-arg loader for `run(job, loader=...)`: (model, tokenizer, processor)."""

    sleep_s: float
    image_size: int
    log_path: str | None = None

    def __call__(self):
        model = StandInModel(self.sleep_s, self.log_path)
        now = time.time()
        log_call(self.log_path, now, now, LOADED)  # when this actor was ready for work
        return model, None, StandInProcessor(self.image_size)


class StandInProcessor:
    """Normalization is the model device's work (InferStage runs it on the GPU): the stand-in
    device does it for free, so the benchmark's host CPU goes only to the pipeline itself."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def normalize(self, pixels, dtype=None):
        return pixels


class StandInActor:
    """The same stand-in as a plain Ray Data actor UDF (for the reference pipeline)."""

    def __init__(self, sleep_s: float, log_path: str | None):
        self.model = StandInModel(sleep_s, log_path)
        now = time.time()
        log_call(log_path, now, now, LOADED)

    def __call__(self, batch: dict) -> dict:
        answers = self.model.answer_batch(None, list(batch["id"]), None)
        return {"id": batch["id"], "answer": [a.text for a in answers]}


@dataclass(frozen=True)
class TimedLoader:
    """Wraps a real loader (e.g. `ModelLoader(job)`): logs every `answer_batch` call like the
    stand-in does (`pid start end rows`, plus a LOADED line), and changes nothing else."""

    base: object
    log_path: str

    def __call__(self):
        model, tokenizer, processor = self.base()
        answer_batch = model.answer_batch

        def timed(tokenizer, queries, image_embeds, **kwargs):
            start = time.time()
            answers = answer_batch(tokenizer, queries=queries, image_embeds=image_embeds, **kwargs)
            log_call(self.log_path, start, time.time(), len(queries))
            return answers

        model.answer_batch = timed  # this instance only
        now = time.time()
        log_call(self.log_path, now, now, LOADED)
        return model, tokenizer, processor
