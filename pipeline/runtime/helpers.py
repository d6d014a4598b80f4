"""Zero-CPU helper actors on the driver's node: the feeder lanes, the roster, the efficiency board.

Pinned there with hard affinity: a lost worker node cannot take them along, and when the
driver's own node is lost the job is lost with it anyway. No restarts: each one's caller
handles it being gone.

The actor class is made once per process (`ray.remote(cls)` builds a new class that Ray pickles
and exports by value on first use, about 40 ms of driver CPU each), and Ray exports it again
by itself when a new cluster connection needs it.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _actor_class(cls: type) -> Any:
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(cls)


def start_on_driver_node(cls: type, *args: Any, node_id: str | None = None) -> Any:
    """An actor of `cls` on `node_id`, by default the calling process's node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = node_id or ray.get_runtime_context().get_node_id()
    pinned = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return _actor_class(cls).options(scheduling_strategy=pinned).remote(*args)
