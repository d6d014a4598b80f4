"""One filesystem abstraction (fsspec) for local paths, s3:// and gs://.

Credentials are never passed in here: s3fs/gcsfs pick them up from the default chain (env,
instance profile, workload identity) on whichever node runs the code, so nothing secret is
pickled into Ray tasks. Only the endpoint and region travel with the `StorageConfig`.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

import fsspec
from fsspec.core import split_protocol

from pipeline.config import StorageConfig

REMOTE_PROTOCOLS = ("s3", "s3a", "gs", "gcs")


def protocol_of(uri: str) -> str:
    proto, _ = split_protocol(uri)
    return proto or "file"


def is_remote(uri: str) -> bool:
    return protocol_of(uri) in REMOTE_PROTOCOLS


def filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[Any, str]:
    """The fsspec filesystem for `uri` and the path inside it (no protocol)."""
    storage = storage or StorageConfig()
    proto = protocol_of(uri)
    kwargs: dict[str, Any] = {}
    if proto in ("s3", "s3a"):
        client_kwargs: dict[str, Any] = {}
        if storage.endpoint_url:
            client_kwargs["endpoint_url"] = storage.endpoint_url
        if storage.region:
            client_kwargs["region_name"] = storage.region
        kwargs = {
            "client_kwargs": client_kwargs,
            "anon": storage.anon,
            "config_kwargs": {
                "connect_timeout": storage.timeout_s,
                "read_timeout": storage.timeout_s,
                "retries": {"max_attempts": storage.retries + 1, "mode": "standard"},
            },
        }
        # s3fs caches instances by arguments; skip_instance_cache keeps a forked/pickled copy
        # from sharing a dead event loop.
        kwargs["skip_instance_cache"] = True
    elif proto in ("gs", "gcs"):
        kwargs = {"token": "anon"} if storage.anon else {}
    fs = fsspec.filesystem(proto, **kwargs)
    path = fs._strip_protocol(uri)
    return fs, path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its protocol."""
    proto, path = split_protocol(uri)
    joined = posixpath.join(path.rstrip("/"), *parts) if proto else os.path.join(path, *parts)
    return f"{proto}://{joined}" if proto else joined


def full_uri(fs: Any, path: str) -> str:
    """A path returned by `fs` turned back into a URI with its protocol."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto in ("file", "local"):
        return path
    return f"{proto}://{path}"
