"""A real S3-compatible server (moto) on 127.0.0.1 for tests, and small helpers around it.

Nothing here leaves loopback: the server binds 127.0.0.1 on a free port, the credentials are
dummies, and `AWS_EC2_METADATA_DISABLED=true` stops botocore from probing 169.254.169.254.

    with moto_s3() as s3:                       # server + dummy credentials + AWS_ENDPOINT_URL
        s3.create_bucket("data")
        s3.put_bytes("data", "a/b.txt", b"hi")
        fs = s3.s3fs()                          # s3fs over the server, no instance cache
        assert s3.list_keys("data") == ["a/b.txt"]

The plain functions (`start_moto`, `aws_env`, `create_bucket`, ...) take an endpoint URL so
they also work through `tests.support.faultproxy.FaultProxy`, whose `url` is an endpoint too.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moto.server import ThreadedMotoServer

REGION = "us-east-1"

# Dummy values: moto does not check signatures, and a test that leaks them leaks nothing.
DUMMY_ENV: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Variables that would make botocore pick other credentials or another endpoint.
_UNSET = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def start_moto() -> tuple[ThreadedMotoServer, str]:
    """Start a moto server on 127.0.0.1 (free port) in a thread; return it and its endpoint URL."""
    # werkzeug logs every request at INFO; tests only need to hear about real trouble.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def reset_moto(endpoint_url: str) -> None:
    """Delete every bucket and object in the server (moto's own reset API): a clean slate per test."""
    req = urllib.request.Request(f"{endpoint_url}/moto-api/reset", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()


def dummy_env(endpoint_url: str | None = None) -> dict[str, str]:
    """The environment variables a test sets: dummy credentials, region, optional endpoint."""
    env = dict(DUMMY_ENV)
    if endpoint_url is not None:
        # botocore >= 1.31 (so boto3, s3fs/aiobotocore, fsspec, pyarrow.parquet via s3fs,
        # and Ray's s3:// I/O through them) read this; pyarrow.fs.S3FileSystem() does not.
        env["AWS_ENDPOINT_URL"] = endpoint_url
    return env


@contextlib.contextmanager
def aws_env(endpoint_url: str | None = None, extra: Mapping[str, str] = ()) -> Iterator[dict]:
    """Set the dummy AWS environment in `os.environ` for the block, then restore it exactly."""
    new = {**dummy_env(endpoint_url), **dict(extra)}
    saved = {k: os.environ.get(k) for k in (*new, *_UNSET)}
    try:
        for k in _UNSET:
            os.environ.pop(k, None)
        os.environ.update(new)
        yield new
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def client(endpoint_url: str, **config: Any):
    """A boto3 S3 client for `endpoint_url` with explicit dummy credentials and region.

    `config` goes to `botocore.config.Config` (for example `retries={"max_attempts": 1}`).
    Clients without config are cached per endpoint (building one takes tens of ms).
    """
    if not config:
        return _cached_client(endpoint_url)
    return _new_client(endpoint_url, **config)


@functools.lru_cache(maxsize=16)
def _cached_client(endpoint_url: str):
    # boto3 clients are thread-safe, so one per endpoint can be shared.
    return _new_client(endpoint_url)


def _new_client(endpoint_url: str, **config: Any):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id=DUMMY_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
        config=Config(**config) if config else None,
    )


def s3fs_filesystem(endpoint_url: str, **kwargs: Any):
    """A fresh `s3fs.S3FileSystem` on `endpoint_url` (no instance cache, no listing cache).

    Credentials come from the environment (see `aws_env`), as in production. Extra keyword
    arguments go to `S3FileSystem` (for example `retries=2`, `config_kwargs={...}`).
    """
    import s3fs

    client_kwargs = {"endpoint_url": endpoint_url, "region_name": REGION}
    client_kwargs.update(kwargs.pop("client_kwargs", {}))
    return s3fs.S3FileSystem(
        client_kwargs=client_kwargs,
        skip_instance_cache=True,
        use_listings_cache=False,
        **kwargs,
    )


def pyarrow_filesystem(endpoint_url: str, **kwargs: Any):
    """A `pyarrow.fs.S3FileSystem` on `endpoint_url` (it ignores AWS_ENDPOINT_URL, so pass it)."""
    from pyarrow import fs as pafs

    scheme, _, host = endpoint_url.partition("://")
    return pafs.S3FileSystem(endpoint_override=host, scheme=scheme, region=REGION, **kwargs)


def create_bucket(endpoint_url: str, bucket: str) -> None:
    """Create `bucket` (no error if it exists already)."""
    s3 = client(endpoint_url)
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)


def put_bytes(endpoint_url: str, bucket: str, key: str, data: bytes) -> None:
    """Write one object."""
    client(endpoint_url).put_object(Bucket=bucket, Key=key, Body=data)


def upload_file(endpoint_url: str, path: str | os.PathLike, bucket: str, key: str) -> None:
    """Upload a local file to `bucket/key`."""
    client(endpoint_url).upload_file(str(path), bucket, key)


def upload_dir(
    endpoint_url: str, local_dir: str | os.PathLike, bucket: str, prefix: str = ""
) -> list[str]:
    """Upload every file under `local_dir` to `bucket/prefix<relative path>`; return the keys."""
    s3 = client(endpoint_url)
    keys = []
    root = Path(local_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = prefix + path.relative_to(root).as_posix()
        s3.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys


def get_bytes(endpoint_url: str, bucket: str, key: str) -> bytes:
    """Read one object."""
    return client(endpoint_url).get_object(Bucket=bucket, Key=key)["Body"].read()


def list_keys(endpoint_url: str, bucket: str, prefix: str = "") -> list[str]:
    """Every key in `bucket` under `prefix`, sorted (paginates, so no 1000-key cap)."""
    s3 = client(endpoint_url)
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return sorted(keys)


def count_objects(endpoint_url: str, bucket: str, prefix: str = "") -> int:
    """How many objects `bucket` holds under `prefix`."""
    return len(list_keys(endpoint_url, bucket, prefix))


@dataclass
class MotoS3:
    """A running moto server and its endpoint, with the helpers above bound to it."""

    server: ThreadedMotoServer
    endpoint_url: str
    buckets: list[str] = field(default_factory=list)

    def create_bucket(self, bucket: str) -> str:
        create_bucket(self.endpoint_url, bucket)
        self.buckets.append(bucket)
        return f"s3://{bucket}"

    def put_bytes(self, bucket: str, key: str, data: bytes) -> str:
        put_bytes(self.endpoint_url, bucket, key, data)
        return f"s3://{bucket}/{key}"

    def upload_file(self, path: str | os.PathLike, bucket: str, key: str) -> str:
        upload_file(self.endpoint_url, path, bucket, key)
        return f"s3://{bucket}/{key}"

    def upload_dir(self, local_dir: str | os.PathLike, bucket: str, prefix: str = "") -> list[str]:
        return upload_dir(self.endpoint_url, local_dir, bucket, prefix)

    def get_bytes(self, bucket: str, key: str) -> bytes:
        return get_bytes(self.endpoint_url, bucket, key)

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        return list_keys(self.endpoint_url, bucket, prefix)

    def count_objects(self, bucket: str, prefix: str = "") -> int:
        return count_objects(self.endpoint_url, bucket, prefix)

    def client(self, **config: Any):
        return client(self.endpoint_url, **config)

    def s3fs(self, **kwargs: Any):
        return s3fs_filesystem(self.endpoint_url, **kwargs)

    def pyarrow_fs(self, **kwargs: Any):
        return pyarrow_filesystem(self.endpoint_url, **kwargs)

    def reset(self) -> None:
        """Empty the whole server: only for a server this test module owns, not a shared one."""
        reset_moto(self.endpoint_url)
        self.buckets.clear()

    def stop(self) -> None:
        self.server.stop()


@contextlib.contextmanager
def moto_s3(set_env: bool = True) -> Iterator[MotoS3]:
    """Start a moto server for the block; with `set_env`, also the dummy AWS env + endpoint."""
    server, url = start_moto()
    s3 = MotoS3(server=server, endpoint_url=url)
    try:
        if set_env:
            with aws_env(url):
                yield s3
        else:
            yield s3
    finally:
        server.stop()
