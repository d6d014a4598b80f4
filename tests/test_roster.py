"""The roster never fails a job: actors already dead, and a roster that is gone, are tolerated.

Run: python -m pytest tests/test_roster.py -q

On the session's local Ray, with stand-in actors that register as model actors do. The lost-node
case on a real multi-node cluster is in tests/test_cluster_faults.py.
"""

from __future__ import annotations

import os

import pytest

from pipeline.runtime.roster import ActorRoster


def _member_class(ray):
    @ray.remote(num_cpus=0)
    class Member:
        """Registers in its constructor, as InferStage does."""

        def __init__(self, roster: ActorRoster):
            roster.register_current_actor()

        def pid(self) -> int:
            return os.getpid()

    return Member


def test_stop_kills_the_living_and_skips_the_dead(ray_cluster):
    ray = ray_cluster
    member = _member_class(ray)
    roster = ActorRoster.start()
    alive, dead = member.remote(roster), member.remote(roster)
    ray.get([alive.pid.remote(), dead.pid.remote()], timeout=60)
    ray.kill(dead, no_restart=True)  # gone before the pass ends (a crash, a lost node)

    assert roster.stop_actors() == 2
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(alive.pid.remote(), timeout=60)
    assert roster.stop_actors() == 0  # drained
    roster.close()


def test_a_lost_roster_neither_blocks_an_actor_nor_fails_the_pass(ray_cluster):
    ray = ray_cluster
    member = _member_class(ray)
    roster = ActorRoster.start()
    ray.kill(roster._actor, no_restart=True)  # as when its node is lost

    late = member.remote(roster)  # e.g. a model actor restarted after its node was lost
    assert ray.get(late.pid.remote(), timeout=60) > 0  # it started, unregistered
    assert roster.stop_actors() == 0  # logged, not raised
    roster.close()  # never raises
    ray.kill(late, no_restart=True)
