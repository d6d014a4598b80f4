"""Stage 2, fetch: image URIs -> image bytes, on CPU tasks, with bounded retries.

Input columns:  shard, row, id, image, image_bytes, questions, question_errors,
                history_queries, history_answers, status, error
Output columns: the same, with image_bytes filled, plus image_identity (ETag / size+mtime /
                content hash) and row_keys (one per question: `planning.modes.row_key`); a row
                whose every key is in `skip_keys` ends as `unchanged`, never fetched

A location outside the job's allowed locations becomes `invalid_path` before any request is
made. Objects larger than `limits.max_image_bytes` are `too_large` from their listed size, so
their bytes are never read. Storage errors are redacted before they become row errors.
http(s) URLs (only with `limits.allow_http`) go through `pipeline.guards.locations.safe_http_get`,
never through fsspec's HTTP filesystem: it re-checks every redirect hop against the policy,
connects only to the addresses it checked, and bounds the size and the whole fetch's time.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.columns import (
    FETCH_ERROR,
    INVALID_PATH,
    OK,
    TOO_LARGE,
    UNCHANGED,
    check_columns,
    set_column,
)
from pipeline.config import JobConfig, LimitsConfig, StorageConfig
from pipeline.guards.locations import (
    FetchError,
    LocationPolicy,
    ResponseTooLarge,
    UnsafeLocation,
    safe_http_get,
)
from pipeline.guards.redact import redact
from pipeline.planning.modes import key_as_int, row_key
from pipeline.storage import filesystem, protocol_of

INPUT_COLUMNS = {
    "id": "manifest id",
    "image": "image URI (null when image_bytes is given)",
    "image_bytes": "image bytes (null when image is given)",
    "questions": "cleaned questions",
    "history_queries": "earlier questions",
    "history_answers": "earlier answers",
    "status": "row status",
}


class FetchStage:
    """Reads image objects through fsspec; one thread pool per task."""

    def __init__(
        self,
        storage: StorageConfig,
        limits: LimitsConfig,
        threads: int,
        policy: LocationPolicy,
        fingerprint: str,
        skip_keys: Any = None,
    ):
        self.storage = storage
        self.limits = limits
        self.threads = threads  # concurrent reads per task (resources.fetch_threads)
        self.policy = policy
        self.fingerprint = fingerprint
        # Sorted uint64 row keys whose rows are marked `unchanged` instead of fetched: an array,
        # or the ObjectRef of one (mapped from the object store on first use, never pickled
        # with the stage).
        self._skip_keys = skip_keys
        self._fs: dict[str, Any] = {}

    @classmethod
    def for_job(
        cls, job: JobConfig, policy: LocationPolicy, fingerprint: str, skip_keys: Any = None
    ) -> FetchStage:
        return cls(
            job.storage, job.limits, job.resources.fetch_threads, policy, fingerprint, skip_keys
        )

    def _filesystem(self, uri: str) -> tuple[Any, str]:
        proto = protocol_of(uri)
        if proto not in self._fs:
            self._fs[proto] = filesystem(uri, self.storage)[0]
        fs = self._fs[proto]
        return fs, fs._strip_protocol(uri)

    def _fetch(self, uri: str) -> tuple[str, bytes | None, str | None, str]:
        """(status, bytes, error, identity) for one URI."""
        reason = self.policy.check(uri)
        if reason:
            return INVALID_PATH, None, reason, ""
        if protocol_of(uri) in ("http", "https"):
            return self._fetch_http(uri)
        limit = self.limits.max_image_bytes
        attempts = self.storage.retries + 1
        last = ""
        for attempt in range(attempts):
            try:
                fs, path = self._filesystem(uri)
                info = fs.info(path)
                size = info.get("size")
                identity = str(
                    info.get("ETag")
                    or info.get("etag")
                    or f"{size}:{info.get('mtime') or info.get('LastModified')}"
                ).strip('"')
                if size is not None and size > limit:
                    return (
                        TOO_LARGE,
                        None,
                        f"image object is {size} bytes > limit {limit}",
                        identity,
                    )
                with fs.open(path, "rb") as f:
                    data = f.read(limit + 1)
                if len(data) > limit:
                    return TOO_LARGE, None, f"image object exceeds {limit} bytes", identity
                return OK, data, None, identity
            except FileNotFoundError as err:
                return FETCH_ERROR, None, redact(f"not found: {err}"), ""
            except (PermissionError, IsADirectoryError) as err:
                return FETCH_ERROR, None, redact(f"{type(err).__name__}: {err}"), ""
            except Exception as err:  # network, throttling, resets: retry with backoff
                last = redact(f"{type(err).__name__}: {err}")
                if attempt + 1 < attempts:
                    time.sleep(min(2.0, 0.1 * 2**attempt))
        return FETCH_ERROR, None, f"gave up after {attempts} attempts: {last}", ""

    def _fetch_http(self, url: str) -> tuple[str, bytes | None, str | None, str]:
        """An http(s) image through `safe_http_get`; client errors (4xx) are not retried."""
        limit = self.limits.max_image_bytes
        attempts = self.storage.retries + 1
        last = ""
        for attempt in range(attempts):
            try:
                data = safe_http_get(url, self.policy, limit, timeout=self.storage.timeout_s)
                return OK, data, None, "sha1:" + hashlib.sha1(data).hexdigest()
            except UnsafeLocation as err:  # a hop (a redirect) the policy refuses: never contacted
                return INVALID_PATH, None, redact(f"refused while fetching: {err}"), ""
            except ResponseTooLarge as err:
                return TOO_LARGE, None, redact(str(err)), ""
            except FetchError as err:
                last = redact(str(err))
                if last.startswith("HTTP 4"):
                    return FETCH_ERROR, None, last, ""
                if attempt + 1 < attempts:
                    time.sleep(min(2.0, 0.1 * 2**attempt))
        return FETCH_ERROR, None, f"gave up after {attempts} attempts: {last}", ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns("FetchStage", batch, INPUT_COLUMNS)
        rows = batch.to_pylist()
        todo = [i for i, r in enumerate(rows) if r["status"] == OK and r["image_bytes"] is None]
        results: dict[int, tuple] = {}
        if todo:
            with ThreadPoolExecutor(min(len(todo), self.threads)) as pool:
                for i, res in zip(
                    todo, pool.map(lambda i: self._fetch(rows[i]["image"]), todo), strict=True
                ):
                    results[i] = res
        limit = self.limits.max_image_bytes
        status, error, data, identity, keys = [], [], [], [], []
        for i, r in enumerate(rows):
            st, err, blob, ident = r["status"], r.get("error"), r["image_bytes"], ""
            if i in results:
                st, blob, err, ident = results[i]
            elif blob is not None:
                ident = "sha1:" + hashlib.sha1(blob).hexdigest()
                if len(blob) > limit:
                    st, blob, err = (
                        TOO_LARGE,
                        None,
                        f"image_bytes is {len(blob)} bytes > limit {limit}",
                    )
            history = [r["history_queries"], r["history_answers"]]
            row_keys = [
                row_key(self.fingerprint, r["id"], ident, q, history) for q in r["questions"]
            ]
            if st == OK and self._all_done(row_keys):
                st, blob, err = UNCHANGED, None, None
            status.append(st)
            error.append(err)
            data.append(blob)
            identity.append(ident)
            keys.append(row_keys)
        out = set_column(batch, "image_bytes", data, pa.binary())
        out = set_column(out, "status", status, pa.string())
        out = set_column(out, "error", error, pa.string())
        out = set_column(out, "image_identity", identity, pa.string())
        return set_column(out, "row_keys", keys, pa.list_(pa.string()))

    @property
    def skip_keys(self) -> np.ndarray | None:
        if self._skip_keys is not None and not isinstance(self._skip_keys, np.ndarray):
            import ray

            self._skip_keys = ray.get(self._skip_keys)
        return self._skip_keys

    def _all_done(self, keys: list[str]) -> bool:
        done = self.skip_keys
        if done is None or not len(done) or not keys:
            return False
        wanted = np.array([key_as_int(k) for k in keys], dtype=np.uint64)
        pos = np.minimum(np.searchsorted(done, wanted), len(done) - 1)
        return bool(np.all(done[pos] == wanted))
