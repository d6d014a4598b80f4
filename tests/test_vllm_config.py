"""The vLLM engine's parts that need no vLLM: the linked model directory and job validation.

(What needs vLLM is in tests/vllm, run in .venv-vllm.) Tensor parallelism and fp8 cannot run
on a CPU: they are tested here as configuration only.
"""

from __future__ import annotations

import json
import os

import pytest

from pipeline.config import JobConfigError, parse_job
from ziya_model.vllm.model_dir import ARCHITECTURE, ModelDirError, build_model_dir


def test_model_dir_links_both_directories_without_copying(tiny_checkpoint, tmp_path):
    out = build_model_dir(tiny_checkpoint.visual_dir, tiny_checkpoint.llm_dir, tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE]
    assert config["text_config"]["model_type"] == "llama"
    assert config["image_token_index"] == config["text_config"]["pad_token_id"] == 0
    weights = sorted(p for p in out.iterdir() if p.name.endswith(".safetensors"))
    assert [p.name for p in weights] == ["llm--model.safetensors", "visual--model.safetensors"]
    for link in weights:
        assert link.is_symlink()  # a link, not a copy
    assert os.path.realpath(out / "visual--model.safetensors") == os.path.realpath(
        tiny_checkpoint.visual_dir / "model.safetensors"
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["query_tokens"] == "visual--model.safetensors"
    assert index["lm_head.weight"] == "llm--model.safetensors"
    assert (out / "tokenizer.model").is_symlink()
    assert not (out / "generation_config.json").exists()  # the job's settings are the only ones
    # Same inputs: the same directory, reused.
    assert build_model_dir(tiny_checkpoint.visual_dir, tiny_checkpoint.llm_dir, tmp_path) == out


def test_model_dir_refuses_bin_only_directories_with_the_fix(tmp_path):
    from ziya_model import write_tiny_checkpoint

    tiny = write_tiny_checkpoint(tmp_path / "tiny", weights_format="bin")
    with pytest.raises(ModelDirError, match=r"only \.bin weights.*python -m ziya_model.convert"):
        build_model_dir(tiny.visual_dir, tiny.llm_dir, tmp_path / "cache")


def _job(**model):
    return {
        "input": {"uri": "m.parquet"},
        "output": {"uri": "out"},
        "model": {"visual": "v", "llm": "l", "engine": "vllm", **model},
    }


def test_vllm_options_are_validated_before_any_work():
    job = parse_job(_job())
    assert job.model.engine == "vllm" and job.model.vllm.enable_prefix_caching
    assert parse_job(_job(engine="transformers")).model.engine == "transformers"
    with pytest.raises(JobConfigError, match="no beam search"):
        parse_job({**_job(), "generation": {"num_beams": 4}})
    with pytest.raises(JobConfigError, match=r"tensor_parallel_size=2 needs resources\.gpus_per"):
        parse_job({**_job(vllm={"tensor_parallel_size": 2}), "resources": {"gpus_per_actor": 1}})
    with pytest.raises(JobConfigError, match="need GPUs"):
        parse_job(_job(vllm={"quantization": "fp8"}))
    with pytest.raises(JobConfigError, match="quantization"):
        parse_job(_job(vllm={"quantization": "int3"}))
    with pytest.raises(JobConfigError, match="engine"):
        parse_job(_job(engine="sglang"))
    # What fits where (configuration only, no GPU here): two 24 GB GPUs, bf16, one replica.
    two = parse_job({**_job(vllm={"tensor_parallel_size": 2}), "resources": {"gpus_per_actor": 2}})
    assert two.model.vllm.tensor_parallel_size == 2
    fp8 = parse_job({**_job(vllm={"quantization": "fp8"}), "resources": {"gpus_per_actor": 1}})
    assert fp8.model.vllm.quantization == "fp8"


def test_the_engine_is_part_of_the_answer_identity(tiny_checkpoint, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.builder import prepare

    pq.write_table(
        pa.table({"id": ["a"], "image": [str(tmp_path / "a.jpg")]}), tmp_path / "m.parquet"
    )
    base = {
        "input": {"uri": str(tmp_path / "m.parquet")},
        "output": {"uri": str(tmp_path / "out")},
        "model": {"visual": str(tiny_checkpoint.visual_dir), "llm": str(tiny_checkpoint.llm_dir)},
        "generation": {"num_beams": 1},
    }
    ref = prepare(parse_job(base))
    vllm = prepare(parse_job({**base, "model": {**base["model"], "engine": "vllm"}}))
    assert vllm.model == ref.model + "+vllm"
    assert vllm.fingerprint != ref.fingerprint
