"""A real multi-node Ray cluster on this machine, for the node-loss tests.

    with LocalCluster() as cluster:                # head: 0 CPUs, where the driver connects
        cluster.add_node("a", cpus=2)              # worker nodes: own session, ports, temp dir
        cluster.add_node("b", cpus=2)
        ... a driver process runs `ray.init(address=cluster.address)` ...
        cluster.kill("a")                          # SIGKILL every process of node a at once

Each node is one `ray start` in a process session of its own, so a node's processes (raylet,
object store, agents, its workers and actors) are exactly the processes of that session. Killing
the session is what a preempted VM does to them, and it touches no other Ray on the machine
(other people's, or the test session's own in-process Ray). Every node gets its own free ports
and temp dir; a worker node carries a custom resource named after it (`node_<name>`), so a test
can place something on it.

Ray resolves `--node-ip-address=127.0.0.1` to the machine's own address whenever multi-node
clusters are enabled, so the nodes register under that address; nothing leaves the machine.
The GCS's health check runs every 0.5 s here (3 s by default, and 5 misses instead of 3), so a
lost node is declared dead in about 2 s instead of about 15-20 s: the same recovery, faster.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

# Node failure detection, for every process the cluster starts (RayConfig reads RAY_<name>).
FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


@dataclass
class Node:
    name: str
    session: int  # session id of every process of this node
    temp_dir: Path
    cpus: int
    killed_at: float | None = None


@dataclass
class LocalCluster:
    """Head (0 CPUs) plus worker nodes, each a `ray start` of its own; see the module doc."""

    env: dict[str, str] = field(default_factory=dict)  # extra environment for every node
    nodes: dict[str, Node] = field(default_factory=dict)
    address: str = ""  # the GCS address drivers connect to

    def __enter__(self) -> LocalCluster:
        gcs, client, dash = _free_ports(3)
        self.address = f"127.0.0.1:{gcs}"
        try:
            self._start(
                "head",
                0,
                "--head",
                f"--port={gcs}",
                f"--ray-client-server-port={client}",
                "--include-dashboard=false",
                f"--dashboard-port={dash}",
                "--dashboard-host=127.0.0.1",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_node(self, name: str, cpus: int) -> Node:
        return self._start(
            name,
            cpus,
            f"--address={self.address}",
            f"--resources={json.dumps({f'node_{name}': 1})}",
        )

    def _start(self, name: str, cpus: int, *args: str) -> Node:
        """`ray start` one node; once more if it fails to come up. Ray gives a starting raylet
        30 s to register with the GCS, which a machine busy with other test runs can exceed; a
        node that never started is not what these tests are about."""
        try:
            return self._start_once(name, cpus, *args)
        except RuntimeError as err:
            self._discard(name)
            print(f"{err}\nretrying once", file=sys.stderr)
            return self._start_once(name, cpus, *args)

    def _discard(self, name: str) -> None:
        """SIGKILL whatever a failed start of node `name` left running, and forget it."""
        node = self.nodes.pop(name)
        for pid in _session_pids(node.session):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(node.temp_dir, ignore_errors=True)

    def _start_once(self, name: str, cpus: int, *args: str) -> Node:
        temp_dir = Path(tempfile.mkdtemp(prefix=f"zc{name[:4]}", dir="/tmp"))  # short: socket paths
        manager, objects, agent_http, agent_grpc, runtime_env, metrics = _free_ports(6)
        workers = random.randrange(20000, 32000 - 100)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env |= {
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            # Workers unpickle the tests' model loaders (tests.support.counting).
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
            "RAY_USAGE_STATS_ENABLED": "0",
            # The fixed default ports of the head's metrics servers, away from other local Rays.
            "AUTOSCALER_METRIC_PORT": str(_free_ports(1)[0]),
            "DASHBOARD_METRIC_PORT": str(_free_ports(1)[0]),
            **FAST_FAILURE_DETECTION,
            **self.env,
        }
        cmd = [
            str(VENV_BIN / "ray"), "start", *args,
            "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
            f"--node-manager-port={manager}", f"--object-manager-port={objects}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            f"--min-worker-port={workers}", f"--max-worker-port={workers + 99}",
            "--object-store-memory=200000000", f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=ROOT,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        node = Node(name, proc.pid, temp_dir, cpus)
        self.nodes[name] = node
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(
                f"ray start ({name}) failed:\n{out.decode(errors='replace')[-3000:]}"
            )
        return node

    def node_of_pid(self, pid: int) -> str | None:
        """The node whose session `pid` belongs to (None: not a process of this cluster)."""
        session = _session_of(pid)
        return next((n.name for n in self.nodes.values() if n.session == session), None)

    def kill(self, name: str) -> int:
        """Lose node `name`: SIGKILL every process of its session at once; returns how many."""
        node = self.nodes[name]
        node.killed_at = time.monotonic()
        pids = _session_pids(node.session)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, every process of every node, and nothing else."""
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            for node in self.nodes.values():
                for pid in _session_pids(node.session):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(
                _session_pids(n.session) for n in self.nodes.values()
            ):
                time.sleep(0.2)
        for node in self.nodes.values():
            shutil.rmtree(node.temp_dir, ignore_errors=True)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _session_of(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[3]) if fields else None


def _session_pids(session: int) -> list[int]:
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(entry.name)
        if fields and int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids
