"""Shared fixtures: one local Ray for the whole session, a tiny checkpoint, real photographs.

Ray is started once (it costs seconds and about 1 GB): tests that need it take `ray_cluster`.
Ray's token auth is disabled for the test cluster only. moto and the test servers bind to
127.0.0.1; the session Ray is started plainly (the loopback-only setup of `ziya-batch run` is
tested in tests/test_exposure.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before Ray or botocore are imported anywhere in the session.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "camera")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The tiny random-weight checkpoint in the real on-disk layout (visual dir + merged LLM)."""
    from ziya_model import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def oracle_checkpoint(tmp_path_factory):
    """The oracle: a tiny checkpoint trained (once a session) to know the photographs' answers
    (`ziya_model.oracle.KNOWN_ANSWERS`)."""
    from ziya_model.oracle import write_oracle_checkpoint

    return write_oracle_checkpoint(tmp_path_factory.mktemp("oracle"))


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """Real photographs shipped inside scikit-image, saved as JPEG files."""
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()).convert("RGB").save(root / f"{name}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3-compatible server (moto) on 127.0.0.1, with dummy credentials in the env.

    AWS_ENDPOINT_URL is set before Ray starts, so Ray workers reach the same server; profile
    and session-token variables that would select other credentials are unset meanwhile.
    """
    from tests.support.s3 import aws_env, start_moto

    server, url = start_moto()
    with aws_env(url):
        yield url
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(moto_endpoint, tmp_path_factory):
    """One local Ray (2 CPUs) for the session, started after the S3 env is in place."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()
