"""Metrics through Ray's metrics API, so Ray's Prometheus endpoint exports them.

Actors record batch latency, images/s and model load time; the driver records committed rows by
status and generated tokens (it sees every row exactly once, after de-duplication, so these
counters match the run summary even when a task was retried).
"""

from __future__ import annotations

import os
import time

PREFIX = "ziya_batch"
_LATENCY_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]


def _metrics():
    from ray.util import metrics

    return metrics


class ActorMetrics:
    """Per-actor metrics; tagged with the actor's pid so images/s is per actor."""

    def __init__(self):
        m = _metrics()
        self.tags = {"actor": str(os.getpid())}
        self.latency = m.Histogram(
            f"{PREFIX}_batch_latency_seconds",
            description="Wall time of one model batch (encode + generate).",
            boundaries=_LATENCY_BOUNDARIES,
            tag_keys=("actor",),
        )
        self.images_per_s = m.Gauge(
            f"{PREFIX}_actor_images_per_second",
            description="Images per second of the last batch, per model actor.",
            tag_keys=("actor",),
        )
        self.load_time = m.Gauge(
            f"{PREFIX}_model_load_seconds",
            description="Time to load the model replica in this actor.",
            tag_keys=("actor",),
        )
        self.images = m.Counter(
            f"{PREFIX}_actor_images_total",
            description="Images encoded by this actor.",
            tag_keys=("actor",),
        )

    def model_loaded(self, seconds: float) -> None:
        self.load_time.set(seconds, tags=self.tags)

    def batch_done(self, rows: list[dict], latency: float, images: int) -> None:
        self.latency.observe(latency, tags=self.tags)
        if images:
            self.images.inc(images, tags=self.tags)
            self.images_per_s.set(images / max(latency, 1e-9), tags=self.tags)


class DriverMetrics:
    """Committed rows by status and tokens generated, recorded once per committed shard."""

    def __init__(self, job_name: str):
        m = _metrics()
        self.tags = {"job": job_name}
        self.rows = m.Counter(
            f"{PREFIX}_rows_total",
            description="Output rows committed, by status.",
            tag_keys=("job", "status"),
        )
        self.tokens = m.Counter(
            f"{PREFIX}_tokens_total",
            description="Tokens generated in committed rows.",
            tag_keys=("job",),
        )
        self.shards = m.Counter(
            f"{PREFIX}_shards_committed_total",
            description="Output shards committed.",
            tag_keys=("job",),
        )
        self.started = time.time()
        # The same figures kept locally, for the summary and for tests.
        self.values: dict[str, float] = {}

    def shard_committed(self, statuses: dict[str, int], tokens: int) -> None:
        for status, n in statuses.items():
            if n:
                self.rows.inc(n, tags={**self.tags, "status": status})
                key = f"rows_total{{status={status}}}"
                self.values[key] = self.values.get(key, 0) + n
        if tokens:
            self.tokens.inc(tokens, tags=self.tags)
        self.values["tokens_total"] = self.values.get("tokens_total", 0) + tokens
        self.shards.inc(1, tags=self.tags)
        self.values["shards_committed_total"] = self.values.get("shards_committed_total", 0) + 1
