"""`ziya-batch submit|status|logs|stop`: run a job file on a Ray cluster through Ray's Job API.

    ziya-batch submit jobs/caption_dataset.yaml --address http://HEAD:8265 [--set k=v] [--wait]
    ziya-batch status SUBMISSION_ID --address http://HEAD:8265
    ziya-batch logs SUBMISSION_ID --address http://HEAD:8265 [--follow]
    ziya-batch stop SUBMISSION_ID --address http://HEAD:8265

On the cluster the job runs `python -m jobs.cli run <job file> [--set ...]`: the same code path as
`ziya-batch run`, with this project directory uploaded as the job's working directory.

The submission id is derived from the validated job (`ziya-<name>-<12 hex>`), so submitting the
same job again — a scheduler retrying, a user pressing enter twice — finds the first submission
instead of starting a second copy. A job that ended FAILED or STOPPED is only run again with
`--resubmit`, as `<id>-r1`, `<id>-r2`, ...; `--run-key` (e.g. the schedule date of a nightly job)
makes each scheduled run a new id while retries of that run stay one.

Token auth (Ray >= 2.52, `RAY_AUTH_MODE=token` on the cluster): the token is read from
`RAY_AUTH_TOKEN`, the file named by `RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token`, and sent as an
`Authorization: Bearer` header. It is never printed and never put in the job's environment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import JobConfig, JobConfigError, load_job

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Uploaded with the project unless listed here (Ray also honours .gitignore / .rayignore).
EXCLUDES = [
    ".venv",
    ".git",
    "**/__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "build",
    "dist",
    "ziya-demo",
    "demo-output",
    "test-artifacts",
    "report.html",
]
# Name parts that mark an environment variable as a credential (AWS_SECRET_ACCESS_KEY,
# AWS_SESSION_TOKEN, HF_TOKEN, OPENAI_APIKEY, ...): refused in the job's runtime env.
_SECRET_PARTS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIALS", "CREDENTIAL")


class SubmitError(Exception):
    """A submission that cannot go ahead; the message says why and what to do."""


# --- pure helpers ----------------------------------------------------------------------------


def project_root() -> Path:
    """The directory uploaded as the job's working dir: the checkout holding this package."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else Path.cwd().resolve()


def submission_id(job: JobConfig, run_key: str | None = None) -> str:
    """`ziya-<name>-<12 hex>`: the same validated job (overrides applied) gives the same id."""
    canonical = json.dumps(
        {"job": job.model_dump(mode="json"), "run_key": run_key},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]
    name = re.sub(r"[^a-z0-9-]+", "-", job.name.lower()).strip("-")[:40] or "job"
    return f"ziya-{name}-{digest}"


def _attempt(base: str, sid: str) -> int | None:
    """0 for `base`, n for `base-rn`, None for an unrelated id."""
    if sid == base:
        return 0
    m = re.fullmatch(re.escape(base) + r"-r([1-9][0-9]*)", sid)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Decision:
    """What `submit` does given the attempts already on the cluster."""

    action: str  # "submit" (a new id), "attach" (an existing live/succeeded id), "refuse"
    submission_id: str
    status: str | None = None  # status of the existing attempt (attach/refuse)


def decide(base: str, existing: dict[str, str], resubmit: bool) -> Decision:
    """Choose between starting `base` (or its next `-rN`), reusing the latest attempt, refusing.

    `existing` maps every submission id on the cluster to its status. Only the latest attempt of
    this job counts: PENDING/RUNNING/SUCCEEDED are reused (never a second copy); FAILED/STOPPED
    are run again only when `resubmit` is set.
    """
    attempts = {n: sid for sid in existing if (n := _attempt(base, sid)) is not None}
    if not attempts:
        return Decision("submit", base)
    n = max(attempts)
    latest, status = attempts[n], existing[attempts[n]]
    if status not in ("FAILED", "STOPPED"):
        return Decision("attach", latest, status)
    if resubmit:
        return Decision("submit", f"{base}-r{n + 1}")
    return Decision("refuse", latest, status)


def entrypoint(job_rel: str, overrides: list[str]) -> str:
    """The shell command the cluster runs: exactly `ziya-batch run`, through `python -m`."""
    args = ["python", "-m", "jobs.cli", "run", job_rel]
    for item in overrides:
        args += ["--set", item]
    return shlex.join(args)


def looks_secret(name: str) -> bool:
    """True for variable names that usually hold credentials (TOKENIZERS_PARALLELISM does not)."""
    return any(part.endswith(_SECRET_PARTS) for part in name.upper().split("_"))


def _check_env_names(env: dict[str, Any], where: str) -> None:
    bad = sorted(k for k in env if looks_secret(k))
    if bad:
        raise SubmitError(
            f"{where}: refusing to put {', '.join(bad)} in the job's environment: credentials "
            "come from the cluster (service account / instance profile), never from the submitter"
        )


def runtime_env(root: Path, extra_json: str | None) -> dict[str, Any]:
    """Working dir = the project; env vars = non-secret settings only; plus user JSON extras."""
    env: dict[str, Any] = {
        "working_dir": str(root),
        "excludes": list(EXCLUDES),
        # Unbuffered so `ziya-batch logs --follow` shows the progress line as it happens.
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }
    if extra_json:
        try:
            extra = json.loads(extra_json)
        except json.JSONDecodeError as err:
            raise SubmitError(f"--runtime-env-json is not valid JSON: {err}") from None
        if not isinstance(extra, dict):
            raise SubmitError("--runtime-env-json must be a JSON object")
        if "working_dir" in extra:
            raise SubmitError("--runtime-env-json: working_dir is the project directory; drop it")
        user_env = extra.pop("env_vars", {}) or {}
        _check_env_names(user_env, "--runtime-env-json env_vars")
        env["env_vars"].update({str(k): str(v) for k, v in user_env.items()})
        env["excludes"] += list(extra.pop("excludes", []) or [])
        env.update(extra)
    return env


def uploaded(root: Path, rel: str) -> bool:
    """Whether Ray's working-dir upload keeps `rel`: not matched by EXCLUDES, `.gitignore` or
    `.rayignore` (top level), using the matcher Ray itself uses for them."""
    from ray._private.thirdparty.pathspec import PathSpec

    lines = list(EXCLUDES)
    ignore_files = [".rayignore"]
    if os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE") != "1":
        ignore_files.append(".gitignore")
    for name in ignore_files:
        with contextlib.suppress(OSError):
            lines += (root / name).read_text(encoding="utf-8").splitlines()
    spec = PathSpec.from_lines("gitwildmatch", lines)
    parts = rel.split("/")
    return not any(spec.match_file("/".join(parts[:i])) for i in range(1, len(parts) + 1))


def _local_paths(job: JobConfig) -> list[str]:
    """Job fields that name local paths: fine on one machine, must be shared on a real cluster."""
    uris = {"input.uri": job.input.uri, "input.images": job.input.images}
    uris |= {"output.uri": job.output.uri}
    uris |= {"model.visual": job.model.visual, "model.llm": job.model.llm}
    out = []
    for key, value in uris.items():
        for uri in [value] if isinstance(value, str) else value or []:
            if "://" not in uri or uri.startswith("file://"):
                out.append(f"{key}={uri}")
    return out


# --- talking to the cluster ------------------------------------------------------------------


def auth_headers() -> dict[str, str]:
    """`Authorization: Bearer <token>` when a Ray token is configured, else nothing.

    Sources in Ray's own order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token. The
    default file (written by any local `ray.init` since Ray 2.59) is skipped when
    RAY_AUTH_MODE=disabled says this client should not authenticate; the explicit variables
    always apply. Ray's client only adds the header itself when RAY_AUTH_MODE=token is set in
    this process, which a user submitting to a remote cluster rarely has.
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise SubmitError(
                f"RAY_AUTH_TOKEN_PATH={path}: cannot read it ({err.strerror})"
            ) from None
    if not token and os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled":
        default = Path.home() / ".ray" / "auth_token"
        with contextlib.suppress(OSError):
            token = default.read_text(encoding="utf-8").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextlib.contextmanager
def _address_env_cleared() -> Iterator[None]:
    """Ray's client lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override an explicit address;
    `--address` (whose default already reads RAY_ADDRESS) must win."""
    saved = {
        k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ
    }
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str) -> Any:
    """A `JobSubmissionClient` for `address`, or a SubmitError saying why it cannot connect."""
    from ray.job_submission import JobSubmissionClient

    headers = auth_headers()
    if headers and address.startswith("http://") and not _is_loopback(address):
        print(
            f"warning: sending the Ray token to {address} over plain HTTP; use a port-forward "
            "or an HTTPS endpoint (see infra/README.md)",
            file=sys.stderr,
        )
    try:
        with _address_env_cleared():
            return JobSubmissionClient(address, headers=headers)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SubmitError(
            f"cannot reach the Ray Job API at {address}: {err} (is the head running with its "
            "dashboard, i.e. ray[default]? for a cluster, is the port-forward up?)"
        ) from None


def _is_loopback(address: str) -> bool:
    host = re.sub(r"^[a-z]+://", "", address).split("/")[0].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _statuses(client: Any) -> dict[str, str]:
    return {j.submission_id: str(j.status.value) for j in client.list_jobs() if j.submission_id}


def _status(client: Any, sid: str) -> str:
    return str(client.get_job_status(sid).value)


def _follow(client: Any, sid: str) -> None:
    """Print the job's log as it grows until the job ends (Ray closes the stream then)."""
    if _status(client, sid) in TERMINAL:  # the stream would only add a few seconds' wait
        print(client.get_job_logs(sid), end="", flush=True)
        return

    async def tail() -> None:
        async for chunk in client.tail_job_logs(sid):
            print(chunk, end="", flush=True)

    asyncio.run(tail())


def _wait(client: Any, sid: str, address: str) -> int:
    """Follow logs to the end; 0 only when the job SUCCEEDED."""
    try:
        with contextlib.suppress(RuntimeError):  # a dropped log stream: the status still tells
            _follow(client, sid)
        status = _status(client, sid)
        while status not in TERMINAL:  # the log stream can close a moment before the status
            time.sleep(0.5)
            status = _status(client, sid)
    except KeyboardInterrupt:
        print(
            f"\nstopped waiting; {sid} keeps running. Stop it with: "
            f"ziya-batch stop {sid} --address {address}"
        )
        return 130
    info = client.get_job_info(sid)
    print(f"{sid}: {status}" + (f" — {info.message}" if info.message else ""))
    return 0 if status == "SUCCEEDED" else 1


def _print_follow_hints(client: Any, sid: str, address: str) -> None:
    dashboard = client.get_address().rstrip("/")
    print(f"  dashboard: {dashboard}/#/jobs/{sid}")
    print(f"  logs:      ziya-batch logs {sid} --follow --address {address}")
    print(f"  status:    ziya-batch status {sid} --address {address}")


# --- subcommands ------------------------------------------------------------------------------


def _submit(args: argparse.Namespace) -> int:
    root = project_root()
    job_path = Path(args.job).resolve()
    job = load_job(job_path, args.overrides)  # a bad job fails here, before anything is sent
    try:
        job_rel = job_path.relative_to(root).as_posix()
    except ValueError:
        raise SubmitError(
            f"{args.job} is outside {root}, the directory uploaded as the job's working dir; "
            "put the job file under it (e.g. jobs/) and use --set for per-run values"
        ) from None
    if not uploaded(root, job_rel):
        raise SubmitError(
            f"{job_rel} would not be uploaded (.gitignore, .rayignore or the upload excludes "
            "leave it out), so the cluster could not read it; put the job file under jobs/"
        )
    env = runtime_env(root, args.runtime_env_json)
    base = submission_id(job, args.run_key)
    for item in _local_paths(job):
        print(
            f"note: {item} is a local path: every node of the cluster must see it", file=sys.stderr
        )

    client = connect(args.address)
    decision = decide(base, _statuses(client), args.resubmit)
    sid = decision.submission_id
    if decision.action == "refuse":
        info = client.get_job_info(sid)
        print(
            f"{sid} already ran and ended {decision.status}"
            + (f": {info.message}" if info.message else "")
            + f"\nlogs: ziya-batch logs {sid} --address {args.address}"
            + "\nrun it again with --resubmit (a new id with an -rN suffix)"
        )
        return 1
    if decision.action == "attach":
        print(f"{sid} is already on the cluster ({decision.status}): not starting a second copy")
    else:
        cmd = entrypoint(job_rel, list(args.overrides))
        try:
            client.submit_job(
                entrypoint=cmd,
                submission_id=sid,
                runtime_env=env,
                metadata={
                    "ziya_batch_job": job.name,
                    "job_file": job_rel,
                    "run_key": args.run_key or "",
                },
            )
        except RuntimeError as err:
            if "already exists" not in str(err):
                raise SubmitError(f"submission of {sid} failed: {err}") from None
            # Another submitter won the race for this id between our listing and our submit.
            print(f"{sid} was submitted concurrently by someone else: not starting a second copy")
        else:
            print(f"submitted {sid} to {args.address}\n  entrypoint: {cmd}")
    _print_follow_hints(client, sid, args.address)
    return _wait(client, sid, args.address) if args.wait else 0


def _show_status(args: argparse.Namespace) -> int:
    client = connect(args.address)
    try:
        info = client.get_job_info(args.submission_id)
    except RuntimeError as err:
        raise SubmitError(f"no job {args.submission_id} at {args.address}: {err}") from None
    print(f"{args.submission_id}: {info.status.value}")
    for label, value in (
        ("message", info.message),
        ("entrypoint", info.entrypoint),
        ("started", _when(info.start_time)),
        ("ended", _when(info.end_time)),
    ):
        if value:
            print(f"  {label}: {value}")
    return 0


def _when(ms: int | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ms / 1000)) if ms else None


def _show_logs(args: argparse.Namespace) -> int:
    client = connect(args.address)
    try:
        if args.follow:
            _follow(client, args.submission_id)
        else:
            print(client.get_job_logs(args.submission_id), end="")
    except RuntimeError as err:
        raise SubmitError(f"no logs for {args.submission_id} at {args.address}: {err}") from None
    except KeyboardInterrupt:
        return 130
    return 0


def _stop(args: argparse.Namespace) -> int:
    client = connect(args.address)
    try:
        stopped = client.stop_job(args.submission_id)
    except RuntimeError as err:
        raise SubmitError(f"cannot stop {args.submission_id} at {args.address}: {err}") from None
    status = _status(client, args.submission_id)
    print(f"{args.submission_id}: {'stop requested' if stopped else 'not running'} ({status})")
    return 0


def _guarded(func: Any) -> Any:
    """Turn expected failures into one clear line on stderr and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        from ray.exceptions import AuthenticationError

        try:
            return int(func(args))
        except (SubmitError, JobConfigError) as err:
            print(f"error: {err}", file=sys.stderr)
        except AuthenticationError as err:
            print(
                f"error: {args.address} refused the request: {str(err).splitlines()[0]} — set "
                "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token "
                "(infra/README.md, 'Token auth')",
                file=sys.stderr,
            )
        return 2

    return run


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register submit, status, logs and stop on the `ziya-batch` parser."""
    address = argparse.ArgumentParser(add_help=False)
    address.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS,
        help=f"Ray Job API (dashboard) URL; default RAY_ADDRESS or {DEFAULT_ADDRESS}",
    )

    p = sub.add_parser("submit", parents=[address], help="submit a job file to a Ray cluster")
    p.add_argument("job", help="job YAML file inside this project (uploaded as the working dir)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job field (repeatable); part of the submission id",
    )
    wait = p.add_mutually_exclusive_group()
    wait.add_argument("--wait", action="store_true", help="follow the logs until the job ends")
    wait.add_argument(
        "--no-wait", dest="wait", action="store_false", help="return at once (default)"
    )
    p.add_argument(
        "--resubmit",
        action="store_true",
        help="run again a job whose last attempt FAILED or was STOPPED (new id with -rN)",
    )
    p.add_argument(
        "--run-key",
        default=None,
        help="distinguishes scheduled runs of the same job (e.g. the date); part of the id",
    )
    p.add_argument(
        "--runtime-env-json",
        default=None,
        help='extra Ray runtime_env as JSON, e.g. \'{"env_vars": {"HF_HUB_OFFLINE": "1"}}\' '
        "(credential-like variable names are refused)",
    )
    p.set_defaults(func=_guarded(_submit))

    for name, func, text in (
        ("status", _show_status, "show a submitted job's status"),
        ("logs", _show_logs, "print a submitted job's logs"),
        ("stop", _stop, "stop a submitted job"),
    ):
        q = sub.add_parser(name, parents=[address], help=text)
        q.add_argument("submission_id", help="the id printed by `ziya-batch submit`")
        if name == "logs":
            q.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        q.set_defaults(func=_guarded(func))
