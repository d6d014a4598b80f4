"""`ziya-batch submit|status|logs|stop` against a real Ray head started by the test.

Run: python -m pytest tests/test_submit.py -q

The head is a separate `ray start --head` on 127.0.0.1 with its own ports and temp dir, with
token auth on (RAY_AUTH_MODE=token, as the infra/ manifests configure clusters), reached only over
HTTP (the Job API): the session's in-process Ray fixture is never touched. The test stops exactly
the processes it started (the head's session), never `ray stop`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import submit
from jobs.cli import main
from pipeline.config import load_job
from pipeline.output.layout import read_output

ROOT = Path(__file__).resolve().parents[1]
JOB = "jobs/caption_dataset.yaml"
VENV_BIN = Path(sys.executable).parent


# --- a Ray head of our own ---------------------------------------------------------------------


@dataclass
class Head:
    address: str
    session: int  # session id of every process the head started
    temp_dir: Path
    token: str
    token_file: Path  # what a user points RAY_AUTH_TOKEN_PATH at


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_pids(session: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # fields[3]: session id
            pids.append(int(stat.parent.name))
    return pids


def _stop_head(head: Head) -> None:
    """SIGTERM, then SIGKILL, every process of the head's session, and nothing else."""
    for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        for pid in _session_pids(head.session):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while _session_pids(head.session) and time.monotonic() < deadline:
            time.sleep(0.2)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def start_head() -> Head:
    """`ray start --head` on loopback with token auth, free ports, the venv first on PATH (the
    job's `python` is looked up there), and a short temp dir (Ray's socket paths are bounded)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="zray", dir="/tmp"))
    token = secrets.token_hex(16)
    token_file = temp_dir / "auth_token"
    token_file.write_text(token + "\n")
    dash, gcs, client, agent_http, agent_grpc = _free_ports(5)
    workers = random.randrange(20000, 32000 - 200)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env |= {
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "AWS_EC2_METADATA_DISABLED": "true",
        # The job driver inherits these from the head and authenticates its own ray.init.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
    }
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}", f"--port={gcs}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        # Worker ports away from the default 10002-19999 that other local Rays use.
        f"--min-worker-port={workers}", f"--max-worker-port={workers + 199}",
        "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    head = Head(f"http://127.0.0.1:{dash}", proc.pid, temp_dir, token, token_file)
    out, _ = proc.communicate(timeout=90)
    if proc.returncode != 0:
        _stop_head(head)
        pytest.fail(f"ray start failed:\n{out.decode(errors='replace')[-3000:]}")
    deadline = time.monotonic() + 60
    probe = urllib.request.Request(
        f"{head.address}/api/version", headers={"Authorization": f"Bearer {token}"}
    )
    while True:  # the dashboard comes up a moment after `ray start` returns
        try:
            with urllib.request.urlopen(probe, timeout=2) as r:
                if r.status == 200:
                    return head
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            _stop_head(head)
            pytest.fail("the Ray dashboard never answered")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def head_process() -> Iterator[Head]:
    h = start_head()
    yield h
    _stop_head(h)


@pytest.fixture
def head(head_process, monkeypatch, tmp_path) -> Head:
    """The head, with this process set up as a user would be: the token in a file named by
    RAY_AUTH_TOKEN_PATH, nothing in ~/.ray (HOME is a fresh directory)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head_process.token_file))
    return head_process


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=submit.auth_headers())


def wait_terminal(address: str, sid: str, timeout: float = 120) -> str:
    c, deadline = client(address), time.monotonic() + timeout
    while (status := c.get_job_status(sid).value) not in submit.TERMINAL:
        assert time.monotonic() < deadline, f"{sid} still {status}"
        time.sleep(0.5)
    return status


# --- the real thing: submit a job file, wait, read its Parquet ---------------------------------


@pytest.fixture
def local_job(tmp_path, tiny_checkpoint, photo_dir) -> tuple[list[str], int]:
    """--set overrides that point jobs/caption_dataset.yaml at a local manifest + tiny model."""
    photos = sorted(photo_dir.glob("*.jpg"))[:4]
    uris = [str(p) for p in photos] + [str(photo_dir / "missing.jpg")]
    manifest = tmp_path / "manifest.parquet"
    ids = [f"img-{i}" for i in range(len(uris))]
    pq.write_table(pa.table({"id": ids, "image": uris, "source": ["test"] * len(ids)}), manifest)
    overrides = [
        f"input.uri={manifest}",
        f"output.uri={tmp_path / 'out'}",
        "output.rows_per_shard=3",
        f"model.visual={tiny_checkpoint.visual_dir}",
        f"model.llm={tiny_checkpoint.llm_dir}",
        "model.dtype=fp32",
        f"model.cache_dir={tmp_path / 'cache'}",
        "generation.max_new_tokens=4",
        "resources.actors=1",
        "resources.gpus_per_actor=0",
        "resources.cpus_per_actor=1",
        "resources.batch_size=4",
        "resources.preprocess_batch_size=8",
        "resources.fetch_threads=2",
        f"limits.allowed_locations={json.dumps([str(photo_dir) + '/'])}",
        "storage.region=null",
    ]
    return overrides, len(uris)


def _submit_argv(head: Head, overrides: list[str], *extra: str) -> list[str]:
    argv = ["submit", JOB, "--address", head.address, *extra]
    for item in overrides:
        argv += ["--set", item]
    return argv


@pytest.mark.slow
def test_submit_runs_the_job_and_a_second_submit_does_not(head, local_job, tmp_path, capsys):
    overrides, n_rows = local_job
    sid = submit.submission_id(load_job(ROOT / JOB, overrides))

    assert main(_submit_argv(head, overrides, "--wait")) == 0
    out = capsys.readouterr().out
    assert f"submitted {sid}" in out
    assert "python -m jobs.cli run jobs/caption_dataset.yaml --set" in out
    assert f"{head.address}/#/jobs/{sid}" in out and f"ziya-batch logs {sid}" in out
    assert f"{sid}: SUCCEEDED" in out

    table = read_output(str(tmp_path / "out"))
    assert table.num_rows == n_rows
    assert sorted(table.column("id").to_pylist()) == [f"img-{i}" for i in range(n_rows)]
    statuses = Counter(table.column("status").to_pylist())
    assert statuses["ok"] == n_rows - 1 and sum(statuses.values()) == n_rows
    ok_answers = [r["answer"] for r in table.to_pylist() if r["status"] == "ok"]
    assert len(ok_answers) == n_rows - 1 and all(ok_answers)
    assert (tmp_path / "out" / "_SUCCESS").exists()
    shards = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "shards").iterdir()}

    # The same job again (a scheduler retrying, waiting again): reported, not run a second time.
    assert main(_submit_argv(head, overrides, "--wait")) == 0
    again = capsys.readouterr().out
    assert f"{sid} is already on the cluster (SUCCEEDED): not starting a second copy" in again
    assert f"{sid}: SUCCEEDED" in again
    ours = [j for j in client(head.address).list_jobs() if j.submission_id.startswith("ziya-")]
    assert [j.submission_id for j in ours] == [sid]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "shards").iterdir()} == shards

    # status / logs read the same job back.
    assert main(["status", sid, "--address", head.address]) == 0
    assert f"{sid}: SUCCEEDED" in capsys.readouterr().out
    assert main(["logs", sid, "--address", head.address]) == 0
    logs = capsys.readouterr().out
    assert "Running entrypoint for job" in logs
    assert head.token not in out + again + logs, "the Ray token was printed"


@pytest.mark.slow
def test_failed_job_runs_again_only_with_resubmit(head, tmp_path, capsys):
    overrides = [
        f"input.uri={tmp_path / 'no-such-manifest.parquet'}",
        f"output.uri={tmp_path / 'o'}",
    ]
    sid = submit.submission_id(load_job(ROOT / JOB, overrides))

    assert main(_submit_argv(head, overrides, "--wait")) == 1
    assert f"{sid}: FAILED" in capsys.readouterr().out

    assert main(_submit_argv(head, overrides)) == 1  # no silent rerun of a failure
    refused = capsys.readouterr().out
    assert f"{sid} already ran and ended FAILED" in refused and "--resubmit" in refused

    assert main(_submit_argv(head, overrides, "--resubmit")) == 0
    assert f"submitted {sid}-r1" in capsys.readouterr().out
    assert wait_terminal(head.address, f"{sid}-r1") == "FAILED"
    ids = sorted(
        j.submission_id for j in client(head.address).list_jobs() if sid in j.submission_id
    )
    assert ids == [sid, f"{sid}-r1"]


@pytest.mark.slow
def test_the_job_api_needs_the_token(head, monkeypatch, capsys):
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")  # and HOME holds no ~/.ray/auth_token
    assert main(["status", "ziya-nope", "--address", head.address]) == 2
    err = capsys.readouterr().err
    assert "refused the request" in err and "RAY_AUTH_TOKEN" in err

    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    assert main(["status", "ziya-nope", "--address", head.address]) == 2
    captured = capsys.readouterr()
    assert "no job ziya-nope" in captured.err  # authenticated: the API answered 404
    assert head.token not in captured.out + captured.err


# --- no cluster needed ---------------------------------------------------------------------------


def test_a_bad_job_fails_before_anything_is_sent(capsys):
    closed = f"http://127.0.0.1:{_free_ports(1)[0]}"
    assert main(["submit", JOB, "--address", closed, "--set", "resources.actors=0"]) == 2
    err = capsys.readouterr().err
    assert "resources.actors" in err and "cannot reach" not in err


def test_job_files_outside_the_project_are_refused(tmp_path, capsys):
    outside = tmp_path / "job.yaml"
    shutil.copy(ROOT / JOB, outside)
    assert main(["submit", str(outside), "--address", "http://127.0.0.1:1"]) == 2
    assert "outside" in capsys.readouterr().err


def test_job_files_the_upload_leaves_out_are_refused(tmp_path, capsys):
    (tmp_path / ".gitignore").write_text("/scratch/\n*.local.yaml\n")
    assert submit.uploaded(tmp_path, "jobs/a.yaml")
    assert not submit.uploaded(tmp_path, "scratch/a.yaml")
    assert not submit.uploaded(tmp_path, "jobs/a.local.yaml")
    assert not submit.uploaded(tmp_path, ".venv/lib/a.yaml")  # the upload's own excludes
    # In this project: the demo's job files live in an ignored folder.
    assert submit.uploaded(ROOT, JOB)
    assert not submit.uploaded(ROOT, "ziya-demo/caption.yaml")


def test_unreachable_cluster_is_a_clear_error(capsys):
    closed = f"http://127.0.0.1:{_free_ports(1)[0]}"
    assert main(["submit", JOB, "--address", closed]) == 2
    assert f"cannot reach the Ray Job API at {closed}" in capsys.readouterr().err


def test_submission_id_is_a_function_of_the_validated_job(tmp_path):
    base = load_job(ROOT / JOB)
    sid = submit.submission_id(base)
    assert sid.startswith("ziya-caption-dataset-") and len(sid.rsplit("-", 1)[1]) == 12
    # Same content in another key order and with comments stripped: same id.
    import yaml

    data = yaml.safe_load((ROOT / JOB).read_text(encoding="utf-8"))
    shuffled = tmp_path / "shuffled.yaml"
    shuffled.write_text(yaml.safe_dump(dict(reversed(list(data.items()))), allow_unicode=True))
    assert submit.submission_id(load_job(shuffled)) == sid
    # Anything that changes the work changes the id; so does the run key.
    assert submit.submission_id(load_job(ROOT / JOB, ["generation.max_new_tokens=65"])) != sid
    assert submit.submission_id(base, run_key="2026-08-20") != sid
    assert submit.submission_id(base, run_key="2026-08-20") == submit.submission_id(
        base, run_key="2026-08-20"
    )


def test_decide_reuses_live_or_succeeded_attempts_and_resubmits_only_when_asked():
    b = "ziya-x-0123456789ab"
    assert submit.decide(b, {}, False) == submit.Decision("submit", b)
    assert submit.decide(b, {"other": "FAILED"}, False) == submit.Decision("submit", b)
    for status in ("PENDING", "RUNNING", "SUCCEEDED"):
        assert submit.decide(b, {b: status}, True) == submit.Decision("attach", b, status)
    for status in ("FAILED", "STOPPED"):
        assert submit.decide(b, {b: status}, False) == submit.Decision("refuse", b, status)
        assert submit.decide(b, {b: status}, True) == submit.Decision("submit", f"{b}-r1")
    # Only the latest attempt counts, and -r10 sorts after -r9.
    chain = {b: "FAILED", f"{b}-r1": "STOPPED", f"{b}-r9": "FAILED", f"{b}-r10": "RUNNING"}
    assert submit.decide(b, chain, False) == submit.Decision("attach", f"{b}-r10", "RUNNING")
    chain[f"{b}-r10"] = "FAILED"
    assert submit.decide(b, chain, True) == submit.Decision("submit", f"{b}-r11")
    assert submit.decide(b, {f"{b}-r1x": "FAILED", f"{b}x": "RUNNING"}, False).action == "submit"


def test_entrypoint_is_ziya_batch_run_and_survives_shell_quoting():
    cmd = submit.entrypoint("jobs/a b.yaml", ["task.caption_prompt=Say 'hi'; rm -rf /"])
    import shlex

    assert shlex.split(cmd) == [
        "python", "-m", "jobs.cli", "run", "jobs/a b.yaml",
        "--set", "task.caption_prompt=Say 'hi'; rm -rf /",
    ]  # fmt: skip


def test_auth_headers_follow_rays_token_sources(tmp_path, monkeypatch):
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert submit.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-default-file\n")
    assert submit.auth_headers() == {"Authorization": "Bearer from-default-file"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the default file is then not used...
    assert submit.auth_headers() == {}
    path = tmp_path / "t"
    path.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))  # ...but explicit settings are
    assert submit.auth_headers() == {"Authorization": "Bearer from-path"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.auth_headers() == {"Authorization": "Bearer from-env"}


def test_runtime_env_uploads_the_project_and_refuses_credentials():
    env = submit.runtime_env(ROOT, '{"env_vars": {"HF_HUB_OFFLINE": "1"}, "pip": ["x"]}')
    assert env["working_dir"] == str(ROOT) and ".venv" in env["excludes"]
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    assert env["pip"] == ["x"]
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "DB_PASSWORD"):
        with pytest.raises(submit.SubmitError, match=name):
            submit.runtime_env(ROOT, json.dumps({"env_vars": {name: "x"}}))
    assert not submit.looks_secret("TOKENIZERS_PARALLELISM")
    with pytest.raises(submit.SubmitError, match="working_dir"):
        submit.runtime_env(ROOT, '{"working_dir": "s3://b/x.zip"}')
