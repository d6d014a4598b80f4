"""Ray Data's execution off the driver: feeder actors run the plan and send back only reports.

Ray Data runs a Dataset's streaming executor in the process that consumes it: scheduling every
block's tasks, their events, resource budgets and backpressure, about 25 µs of CPU per output
row at 1,024-row blocks plus 5 % of a core per second (bench/bench_driver_cpu.py). In the driver
that capped a whole job at what one core can schedule. So the driver consumes nothing itself:

    feeders = Feeders.start(lanes)                  # driver, at the start of `run`
    for reports in feeders.feed(make_plan, max_crashed):  # a pass: lane i runs make_plan(i, n)
        tracker.add(reports)                        # driver: tally, commit complete shards
    feeders.release()                               # idle, for the process's next run
    feeders.close()                                 # or, stopping early: kill them and their work

Each lane is a zero-CPU actor on the driver's node (a lost worker node cannot take it along;
when the driver's node is lost the job is lost with it anyway). It builds its part of the plan
(`make_plan(lane, lanes)`, the builder's), consumes it, and streams the write stage's reports
back, gathered for up to FLUSH_S: the driver's work then grows with the seconds a run lasts and
its shards, not with its rows or blocks. With several lanes, each runs its own executor on its
own share of the blocks and model actors, so the rows/s a job can schedule grow with the lanes.

A run that ends normally leaves its lanes idle for the next run of the same driver process on
the same cluster (a notebook, a service, a benchmark's runs): a lane's start, a process and Ray
Data's imports, is seconds of CPU on the run's critical path, so it is paid once per driver
process, as the driver's own imports are. A run that stops early kills its lanes.

Killing a lane stops its execution at once: the tasks and model actors its executor started are
owned by it, and Ray ends them with their owner (the early-stop path: abort threshold, a failed
commit). A lane that dies on its own (its process killed, out of memory) fails the pass with
its error; the shards committed so far stay committed, and a rerun resumes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from pipeline.runtime.helpers import start_on_driver_node

# How long a lane gathers reports before it sends them: the longest a complete shard waits for
# its commit on this account, and at most 1 / FLUSH_S messages a second for the driver per lane.
FLUSH_S = 0.25

# How long a run waits for an idle lane to answer before it starts a fresh one instead.
LIVE_TIMEOUT_S = 10.0

_END = object()
# Idle lanes by Ray job id (a new connection to a cluster is a new job: its lanes are new).
_IDLE: dict[str, list] = {}


class Feeder:
    """One lane: runs its part of a pass's plan and yields the reports, gathered (an actor)."""

    def __init__(self):
        import ray.data  # noqa: F401 - at start: before the first pass arrives

    def feed(
        self,
        make_plan: Callable[[int, int], Any],
        lane: int,
        lanes: int,
        max_crashed: int,
        data_context: Any,
    ) -> Iterator[Any]:
        import pyarrow as pa
        from ray.data import DataContext

        # The driver's Ray Data settings (progress bars, limits) hold in this process too.
        DataContext._set_current(data_context)
        ds = make_plan(lane, lanes)
        if ds is None:
            return  # nothing for this lane (fewer block ranges than lanes)
        # A batch that crashed its worker on every retry is dropped, up to this many; its rows
        # stay missing and the driver retries them one per batch.
        ds.context.max_errored_blocks = max_crashed
        inbox: queue.Queue = queue.Queue()
        threading.Thread(target=_pull, args=(ds, inbox), daemon=True).start()
        while True:
            gathered = [inbox.get()]  # wait for the first report, then gather for FLUSH_S
            deadline = time.monotonic() + FLUSH_S
            while not _last(gathered[-1]):
                try:
                    gathered.append(inbox.get(timeout=max(deadline - time.monotonic(), 0)))
                except queue.Empty:
                    break
            last = gathered.pop() if _last(gathered[-1]) else None
            if gathered:
                yield pa.concat_tables(gathered)
            if isinstance(last, BaseException):
                raise last
            if last is _END:
                return

    def cpu_s(self) -> float:
        """This lane's CPU seconds so far (every thread: Ray Data's executor, Ray's own)."""
        return time.process_time()


def _last(item: Any) -> bool:
    """Whether `item` ends the stream: its end, or the error that ended it."""
    return item is _END or isinstance(item, BaseException)


def _pull(ds: Any, inbox: queue.Queue) -> None:
    """Consume the plan (on its own thread, so the lane can send reports while waiting)."""
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            inbox.put(batch)
        inbox.put(_END)
    except BaseException as error:  # handed to the lane's generator, which raises it
        inbox.put(error)


class Feeders:
    """The driver's handle on its lanes."""

    def __init__(self, actors: list, job_id: str, cpu0: list[float]):
        self.actors = actors
        self.job_id = job_id
        self.cpu0 = cpu0  # each lane's CPU seconds when this run took it (0 for a fresh one)

    @classmethod
    def start(cls, lanes: int) -> Feeders:
        """`lanes` lanes on this node: idle ones this process left, then fresh ones (which import
        Ray Data as they start, before their first pass arrives)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        job_id = ray.get_runtime_context().get_job_id()
        actors, cpu0 = [], []
        for actor in _IDLE.pop(job_id, []):
            try:
                if len(actors) < lanes:
                    cpu0.append(ray.get(actor.cpu_s.remote(), timeout=LIVE_TIMEOUT_S))
                    actors.append(actor)
                    continue
            except (RayActorError, GetTimeoutError):
                pass  # gone (or going) since the last run: a fresh lane takes its place
            ray.kill(actor)
        fresh = lanes - len(actors)
        actors += [start_on_driver_node(Feeder) for _ in range(fresh)]
        return cls(actors, job_id, cpu0 + [0.0] * fresh)

    def feed(self, make_plan: Callable[[int, int], Any], max_crashed: int) -> Iterator[Any]:
        """Every lane's reports, as they come."""
        import ray
        from ray.data import DataContext
        from ray.exceptions import RayActorError

        lanes, context = len(self.actors), DataContext.get_current()
        streams = [
            actor.feed.options(num_returns="streaming").remote(
                make_plan, i, lanes, max_crashed, context
            )
            for i, actor in enumerate(self.actors)
        ]
        while streams:
            ready, _ = ray.wait(streams, num_returns=1)
            stream = ready[0]
            try:
                ref = next(stream)
            except StopIteration:
                streams.remove(stream)
                continue
            try:
                yield ray.get(ref)
            except RayActorError as err:
                raise RuntimeError(
                    "a feeder lane (the process that runs Ray Data's scheduling for this job, on "
                    "the driver's node) died; committed shards stay committed: rerun to resume"
                ) from err

    def cpu_s(self) -> float:
        """The lanes' CPU seconds in this run so far, together (a fresh lane's start included)."""
        import ray

        return sum(ray.get([actor.cpu_s.remote() for actor in self.actors])) - sum(self.cpu0)

    def release(self) -> None:
        """After a run that ended normally: the lanes wait for this process's next run."""
        _IDLE.setdefault(self.job_id, []).extend(self.actors)
        self.actors = []

    def close(self) -> None:
        """Kill the lanes: whatever their executors still run ends with them."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
