"""What a local run exposes: `ziya-batch run` without RAY_ADDRESS listens on 127.0.0.1 only, with
Ray's token auth on, as the README's Security section says.

Run: python -m pytest tests/test_exposure.py -q -s      (-s shows every socket found)

The real CLI runs a small job on the tiny checkpoint in a process session of its own, as a user
would start it (no RAY_ADDRESS, no RAY_AUTH_MODE, a fresh HOME). While it runs, the test lists the
listening TCP sockets of every process of that session (the driver, GCS, raylet, dashboard and
agents, workers and model actors) every 0.2 s, and checks each address against loopback.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or address).is_loopback


def _session_pids(session: int) -> list[int]:
    pids = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == session:
                pids.append(proc.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def _listening(pids: list[int]) -> set[tuple[str, str, int]]:
    """(process, address, port) of every listening TCP socket of `pids`."""
    found = set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            name = proc.name().split(".")[0]  # ray::_Roster.add -> ray::_Roster
            if name.startswith("python"):  # ray's own python processes: say which one
                script = next((a for a in proc.cmdline()[1:] if a.endswith(".py")), "")
                name = Path(script).stem or "driver"
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((name, conn.laddr.ip, conn.laddr.port))
        except psutil.Error:
            continue  # a worker that just exited
    return found


@pytest.mark.slow
def test_a_local_run_listens_only_on_loopback_with_token_auth(tmp_path, tiny_checkpoint, photo_dir):
    photos = sorted(photo_dir.glob("*.jpg"))
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(
        pa.table({"id": [p.stem for p in photos], "image": [str(p) for p in photos]}), manifest
    )
    job = {
        "name": "exposure",
        "input": {"uri": str(manifest)},
        "output": {"uri": str(tmp_path / "out"), "rows_per_shard": 3},
        "task": {"kind": "caption", "caption_prompt": "Describe the image."},
        "model": {"visual": str(tiny_checkpoint.visual_dir), "llm": str(tiny_checkpoint.llm_dir)},
        "generation": {"max_new_tokens": 4},
        "resources": {"actors": 1, "batch_size": 2, "preprocess_batch_size": 2},
        "limits": {"allowed_locations": [f"{photo_dir}/"]},
    }
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    home = tmp_path / "home"
    home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="zexp", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"HOME": str(home), "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [str(VENV_BIN / "ziya-batch"), "run", str(job_file)],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    sockets: set[tuple[str, str, int]] = set()
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            sockets |= _listening(_session_pids(proc.pid))
            time.sleep(0.2)
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _session_pids(proc.pid):  # whatever of that Ray is still up: ours alone
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, out[-5000:]
    assert "rows out" in out and "ok" in out, out[-3000:]

    by_process = defaultdict(list)
    for name, ip, port in sorted(sockets):
        by_process[name].append(f"{ip}:{port}")
    print("\nlistening sockets of a local run:")
    for name, addresses in sorted(by_process.items()):
        print(f"  {name:<24} {' '.join(addresses)}")
    # The sample saw the processes that matter, so "nothing exposed" means something.
    for expected in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::MapWorker"):
        assert any(name.startswith(expected) for name in by_process), (expected, by_process)
    exposed = sorted((name, ip, port) for name, ip, port in sockets if not _loopback(ip))
    assert exposed == [], f"listening beyond loopback: {exposed}"
    # Ray's token auth stayed on: the local Ray made a token for this user and said so.
    assert (home / ".ray" / "auth_token").stat().st_size > 0
    assert "Token authentication is enabled" in out, out[-3000:]
