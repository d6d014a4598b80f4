"""End a model actor whose model call hangs, so that Ray retries its batch as after a crash.

A model call that never returns (a stuck CUDA kernel, a collective waiting for a peer that is
gone, a deadlocked library) cannot be interrupted from Python, and Ray Data waits for it
forever: the job stalls with its GPUs busy and nothing to show. The process is the only thing
that can be ended. So `InferStage` runs each model call under `CallWatchdog.guard()`, and a
thread of the actor watches the age of the running call; past the limit (`run.batch_timeout_s`)
it says what hung and ends the process. To Ray that is an actor crash, handled as one: the actor
is restarted, its batches retried (`run.max_task_retries`), a batch that hangs every time is
dropped and its rows retried one per batch (`builder.run`), and only a row that hangs on its own
ends as `inference_error`.

    watchdog = CallWatchdog(limit_s=900)
    with watchdog.guard("generate"):
        answers = model.answer_batch(...)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("ziya_batch")

# What a hung actor exits with (the convention of timeout(1)); any non-zero code is a crash to
# Ray, this one tells a reader of the raylet logs which kind.
HUNG_EXIT_CODE = 124


class CallWatchdog:
    """Ends this process when a guarded call runs longer than `limit_s` (None: never)."""

    def __init__(self, limit_s: float | None, exit: Callable[[int], None] = os._exit):
        self.limit_s = limit_s
        self._exit = exit  # replaceable in tests; os._exit skips cleanup that could hang too
        self._running: dict[int, tuple[float, str]] = {}  # token -> (start, what)
        self._tokens = itertools.count()
        self._lock = threading.Lock()
        self.fired: str | None = None
        if limit_s is not None:
            # A tenth of the limit (at most 1 s): a hang is caught within 10% of the limit.
            self._tick = min(1.0, limit_s / 10)
            threading.Thread(target=self._watch, name="model-call-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        if self.limit_s is None:
            yield
            return
        token = next(self._tokens)
        with self._lock:
            self._running[token] = (time.monotonic(), what)
        try:
            yield
        finally:
            with self._lock:
                del self._running[token]

    def _watch(self) -> None:
        while True:
            time.sleep(self._tick)
            now = time.monotonic()
            with self._lock:
                hung = [(now - start, what) for start, what in self._running.values()]
            hung = [(age, what) for age, what in hung if age > self.limit_s]
            if hung:
                age, what = max(hung)
                self.fired = (
                    f"model call {what} still running after {age:.1f} s > run.batch_timeout_s "
                    f"{self.limit_s:g} s: taken as hung, ending this actor (pid {os.getpid()}) so "
                    "that its batches are retried as after a crash"
                )
                log.error(self.fired)
                print(self.fired, file=sys.stderr, flush=True)  # the actor's log, even unconfigured
                self._exit(HUNG_EXIT_CODE)
                return
