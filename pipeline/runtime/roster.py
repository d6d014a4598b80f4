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
    roster.close()                    # driver, at the end of the pass

The roster is bookkeeping, never a reason for a job to fail. It is a zero-CPU actor pinned to
the driver's node: a lost worker node (spot preemption) cannot take it along, and when the
driver's own node is lost the job is lost with it anyway. Should it still be gone (its node
lost, a cluster that placed it elsewhere), a model actor starts without registering, and
stopping a pass logs what it could not stop: Ray Data still drops its own references, so such
an actor is only at risk of the leak described above. Stopping tolerates actors, and nodes,
that are already gone.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.runtime.helpers import start_on_driver_node

log = logging.getLogger("ziya_batch")

# How long a call to the roster may take. It is a zero-CPU actor on the driver's node answering
# dictionary operations: a call that takes longer means it is unreachable (its node is being
# lost), and waiting on would only stall a model actor's start or the end of a pass.
ROSTER_CALL_TIMEOUT_S = 60.0


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


def _roster_errors() -> tuple[type[BaseException], ...]:
    """What a call to a roster that is gone, or going, raises."""
    from ray.exceptions import GetTimeoutError, RayActorError

    # RayActorError covers ActorDiedError (its node was lost) and ActorUnavailableError (its
    # node is unreachable, not yet known dead).
    return (RayActorError, GetTimeoutError)


class ActorRoster:
    """Driver-side handle on a `_Roster` actor; picklable, so model actors can register."""

    def __init__(self, actor):
        self._actor = actor

    @classmethod
    def start(cls, node_id: str | None = None) -> ActorRoster:
        """Start a roster on `node_id`, by default the driver's own node (hard affinity: it is
        never placed on, or moved to, a node whose loss the job must survive)."""
        return cls(start_on_driver_node(_Roster, node_id=node_id))

    def register_current_actor(self) -> None:
        """Called in a model actor's constructor. Waits for the roster, so an actor is on the
        roster before Ray Data sees it ready and gives it work. A roster that is gone is logged,
        not raised: the actor must still start (a restarted actor re-registers, and its pass may
        be half done)."""
        import ray

        context = ray.get_runtime_context()
        try:
            ray.get(
                self._actor.add.remote(context.get_actor_id(), context.current_actor),
                timeout=ROSTER_CALL_TIMEOUT_S,
            )
        except _roster_errors() as err:
            log.warning("model actor starts unregistered: its pass's roster is gone (%s)", err)

    def stop_actors(self) -> int:
        """Kill every actor registered so far (without restart); returns how many were asked to
        stop. Never raises: actors already dead, or on a lost node, need no stopping, and a roster
        that is gone is logged (its actors are left to Ray Data)."""
        import ray

        try:
            actors = ray.get(self._actor.drain.remote(), timeout=ROSTER_CALL_TIMEOUT_S)
        except _roster_errors() as err:
            log.warning("could not reach the roster to stop this pass's model actors: %s", err)
            return 0
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)  # a no-op for an actor that is already dead
            except Exception as err:  # an actor whose node is gone cannot hold resources either
                log.info("model actor already gone: %s", err)
        return len(actors)

    def close(self) -> None:
        """Stop the remaining actors and the roster. Called in a `finally`, so it never raises:
        an error here must not hide the one that ended the job (it is logged instead)."""
        import ray

        try:
            self.stop_actors()
            ray.kill(self._actor, no_restart=True)
        except Exception as err:
            log.warning("could not stop the roster of this pass: %s", err)
