"""Stop a finished pass's model actors for certain, instead of waiting for garbage collection.

Ray Data gives a finished actor pool's actors back by dropping its references to them (it keeps
`ray.kill` for forced shutdowns, and by then the autoscaler has already released idle actors),
so an actor lives, holding its GPU/CPUs, for as long as anything else in the process still
references its handle. Something often does: when a batch crashes its actor and Ray Data drops
that block (`max_errored_blocks`), it logs the error with `exc_info`; the traceback's frames
hold the task's done-callback, which holds the actor handle. Any log handler that keeps records
(pytest's capture handler, a notebook, an in-memory handler) then pins the actor, and the next
pass on the same cluster waits forever for the resources it holds.

So each model actor registers its own handle here when it starts, and `run` kills them all when
a pass ends, whatever happened in it:

    roster = ActorRoster.start()      # driver, before building the plan
    ... InferStage(..., roster=roster) registers each actor in its __init__ ...
    roster.stop_actors()              # driver, after the pass: every registered actor is killed
    roster.close()                    # driver, at the end of the run
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("ziya_batch")


class _Roster:
    """A zero-CPU actor holding the handles of the model actors that registered."""

    def __init__(self):
        self._actors: dict[str, Any] = {}

    def add(self, actor_id: str, actor) -> None:
        # Keyed by actor id: a restarted actor runs its constructor again.
        self._actors[actor_id] = actor

    def drain(self) -> list:
        actors, self._actors = list(self._actors.values()), {}
        return actors


class ActorRoster:
    """Driver-side handle on a `_Roster` actor; picklable, so model actors can register."""

    def __init__(self, actor):
        self._actor = actor

    @classmethod
    def start(cls) -> ActorRoster:
        import ray

        remote = ray.remote(num_cpus=0, max_restarts=0)(_Roster)
        return cls(remote.remote())

    def register_current_actor(self) -> None:
        """Called in a model actor's constructor. Waits for the roster, so an actor is on the
        roster before Ray Data sees it ready and gives it work."""
        import ray

        context = ray.get_runtime_context()
        ray.get(self._actor.add.remote(context.get_actor_id(), context.current_actor))

    def stop_actors(self) -> int:
        """Kill every actor registered so far (without restart); returns how many."""
        import ray

        actors = ray.get(self._actor.drain.remote())
        for actor in actors:
            ray.kill(actor, no_restart=True)  # a no-op for an actor that is already dead
        return len(actors)

    def close(self) -> None:
        """Stop the remaining actors and the roster. Called in a `finally`, so it never raises:
        an error here must not hide the one that ended the job (it is logged instead)."""
        import ray

        try:
            self.stop_actors()
            ray.kill(self._actor, no_restart=True)
        except Exception as err:  # e.g. the roster's node was lost
            log.warning("could not stop the model actors of this pass: %s", err)
