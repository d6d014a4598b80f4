"""`ziya-batch run JOB.yaml`: the one code path that runs a job, locally or inside a Ray Job.

    ziya-batch run jobs/caption_dataset.yaml --set resources.actors=4
    python -m jobs.cli run jobs/caption_dataset.yaml        # what a submitted Ray Job executes

Connects to RAY_ADDRESS (or --address) when set, else starts a local Ray whose every port
listens on 127.0.0.1 only (README, Security; tests/test_exposure.py).
"""

from __future__ import annotations

import logging
import os
import sys
import time

from pipeline.builder import Summary, prepare, run
from pipeline.config import JobConfig, JobConfigError, load_job
from pipeline.guards.redact import RedactingFilter, redact
from pipeline.output.commit import JobAborted, Tally
from pipeline.planning.manifest import ManifestError
from pipeline.runtime.efficiency import rows as efficiency_rows


def init_ray(address: str | None = None) -> None:
    import ray
    import ray.data

    # Our own progress line replaces Ray Data's progress bars and per-operator log lines.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # A local Ray never listens beyond this machine (issue 7: the dashboard and job API run
        # code for whoever reaches them). Token auth stays as Ray sets it (on since Ray 2.52).
        _single_node_on_loopback()
        ray.init(
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
        )
        if ray.util.get_node_ip_address() != "127.0.0.1":
            logging.getLogger("ziya_batch").warning(
                "the local Ray runs on %s, not 127.0.0.1: its ports listen on every interface",
                ray.util.get_node_ip_address(),
            )


def _single_node_on_loopback() -> None:
    """Make the local Ray's node address 127.0.0.1, which is what binds its ports to loopback.

    Ray binds every listener of a node (GCS, raylet, object manager, each worker's and actor's
    gRPC server, the dashboard agent, the runtime-env agent, the metrics exporters) to 127.0.0.1
    when the node's address is loopback, and to all interfaces otherwise. On Linux it replaces
    a loopback `_node_ip_address` with the machine's address unless multi-node clusters are
    switched off (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, Ray's default on macOS and Windows,
    where it keeps single-node Rays on loopback). A local run is one node by definition.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when Ray is first imported
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # already imported: the value is read from here at ray.init
        constants.ENABLE_RAY_CLUSTER = False


class Progress:
    """rows done / total, rows/s, ETA, failures: a live line on a terminal, a log line every
    10 s otherwise (Ray job logs)."""

    def __init__(self, stream=sys.stderr, quiet: bool = False):
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty()
        self.last = 0.0

    def __call__(self, tally: Tally, total: int, elapsed: float) -> None:
        now = time.time()
        if self.quiet or now - self.last < (0.5 if self.tty else 10):
            return
        self.last = now
        # Rows as they arrive: commits trail them (a shard commits once all its rows are in).
        done = tally.rows_arrived
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        line = (
            f"rows {done}/{total} ({100 * done / max(total, 1):.0f}%)  {rate:.1f} rows/s  "
            f"ETA {_fmt_s(eta)}  failures {tally.failures_seen}  shards {tally.shards}"
        )
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and not self.quiet and self.last:
            self.stream.write("\n")


def _fmt_s(s: float) -> str:
    if s != s:  # NaN
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_summary(summary: Summary) -> str:
    rows = [
        ("output", summary.output),
        ("mode", summary.mode + (f" (run {summary.run_id})" if summary.run_id else "")),
        (
            "shards",
            f"{summary.shards_committed} committed, {summary.shards_skipped} already done, "
            f"{summary.shards_total} in all",
        ),
        ("rows in", str(summary.rows_in)),
        ("rows out", str(summary.rows_out)),
    ]
    rows += [(f"  {k}", str(v)) for k, v in sorted(summary.statuses.items())]
    rows += [
        ("images/s", f"{summary.images_per_s:.2f}"),
        ("tokens/s", f"{summary.tokens_per_s:.1f}"),
        ("wall time", f"{summary.wall_s:.1f} s"),
        ("model", summary.model),
    ]
    # How well the model devices were used (pipeline/runtime/efficiency.py), both engines.
    rows += efficiency_rows(summary.efficiency)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def run_job(job: JobConfig, address: str | None = None, quiet: bool = False) -> Summary:
    # Manifests and model files are checked before Ray starts: a broken job fails in seconds.
    context = prepare(job)
    init_ray(address)
    progress = Progress(quiet=quiet)
    try:
        return run(job, progress=progress, context=context)
    finally:
        progress.close()


def run_job_file(
    path: str, overrides: list[str], address: str | None = None, quiet: bool = False
) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Storage errors quote URLs and headers: nothing this process logs may carry a credential.
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    try:
        job = load_job(path, overrides)
        summary = run_job(job, address=address, quiet=quiet)
    except (JobConfigError, ManifestError, JobAborted) as err:
        print(f"error: {redact(err)}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0
