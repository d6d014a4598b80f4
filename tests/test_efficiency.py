"""The decode roofline (ziya_model/roofline.py), the summary's efficiency section
(pipeline/runtime/efficiency.py), and the transformers engine over several GPUs (`model.device_map`).

Sharding over GPUs cannot run on a CPU: `device_map=auto` is tested here as configuration
only (validation, what the loader is asked for, the refusal on CPU).
"""

from __future__ import annotations

import json

import pytest

from pipeline.config import JobConfigError, parse_job
from pipeline.runtime import efficiency
from ziya_model import roofline
from ziya_model.roofline import GPUS, decode_bound, gpu_type_of, llama_params, roofline_fraction

# Ziya-LLaMA-13B's config (the release's config.json, the keys the count uses).
ZIYA_LLM = {
    "hidden_size": 5120,
    "num_hidden_layers": 40,
    "intermediate_size": 13824,
    "vocab_size": 39424,
    "num_attention_heads": 40,
}


def _job(**sections):
    data = {"input": {"uri": "m.parquet"}, "output": {"uri": "out"}}
    data["model"] = {"visual": "v", "llm": "l", **sections.pop("model", {})}
    data.update(sections)
    return parse_job(data)


def test_one_gpu_table_with_every_named_gpu():
    assert set(GPUS) == {
        "H100-SXM",
        "H100-PCIe",
        "H200",
        "A100-40GB",
        "A100-80GB",
        "L40S",
        "L4",
        "A10G",
        "RTX-4090",
    }
    assert GPUS["H100-SXM"].bandwidth_tb_s == 3.35 and GPUS["H100-SXM"].bf16_tflops == 989.0
    assert GPUS["H200"].bandwidth_tb_s == 4.8
    # The bench reads the same table: no second copy of these figures.
    import bench.gpu_check as gpu_check

    assert gpu_check.GPUS is GPUS


def test_device_names_map_to_the_table():
    assert gpu_type_of("NVIDIA H100 80GB HBM3") == "H100-SXM"
    assert gpu_type_of("NVIDIA H100 PCIe") == "H100-PCIe"
    assert gpu_type_of("NVIDIA H200") == "H200"
    assert gpu_type_of("NVIDIA A100-SXM4-40GB") == "A100-40GB"
    assert gpu_type_of("NVIDIA A100-SXM4-80GB") == "A100-80GB"
    assert gpu_type_of("NVIDIA L40S") == "L40S"
    assert gpu_type_of("NVIDIA L4") == "L4"
    assert gpu_type_of("NVIDIA A10G") == "A10G"
    assert gpu_type_of("NVIDIA GeForce RTX 4090") == "RTX-4090"
    assert gpu_type_of("Tesla T4") is None


def test_llama_params_counts_the_13b_model():
    # 2 x 39424 x 5120 (embeddings, head) + 40 x (4 x 5120^2 + 3 x 5120 x 13824 + 2 x 5120) + 5120
    assert llama_params(ZIYA_LLM) == 13_091_886_080
    tied = llama_params({**ZIYA_LLM, "tie_word_embeddings": True})
    assert tied == 13_091_886_080 - 39424 * 5120
    gqa = llama_params({**ZIYA_LLM, "num_key_value_heads": 8})
    assert gqa == 13_091_886_080 - 40 * 2 * 5120 * (5120 - 8 * 128)


def test_decode_bound_is_bandwidth_then_compute_bound():
    p = 13_091_886_080
    # One sequence: all weights read per token; 26.2 GB at 3.35 TB/s -> ~128 tokens/s.
    one = decode_bound("H100-SXM", p, 2, 1)
    assert one == pytest.approx(3.35e12 / (2 * p))
    assert decode_bound("H100-SXM", p, 2, 64) == pytest.approx(64 * one)
    # Hundreds of sequences: the compute bound, 989 TFLOP/s over 2 FLOPs per parameter.
    assert decode_bound("H100-SXM", p, 2, 512) == pytest.approx(989e12 / (2 * p))
    # fp8 weights halve the bytes: twice the bandwidth bound.
    assert decode_bound("L40S", p, 1, 8) == pytest.approx(2 * decode_bound("L40S", p, 2, 8))
    assert roofline_fraction(0.5 * one, "H100-SXM", p, 2, 1) == pytest.approx(0.5)


def test_gpu_type_is_validated_and_described():
    assert _job(resources={"gpu_type": "H200", "gpus_per_actor": 1}).resources.gpu_type == "H200"
    with pytest.raises(JobConfigError, match=r"resources\.gpu_type.*H100-SXM"):
        _job(resources={"gpu_type": "H300"})
    with pytest.raises(JobConfigError, match="gpus_per_actor is 0"):
        _job(resources={"gpu_type": "H200"})


def test_efficiency_section_transformers_with_roofline():
    job = _job(resources={"gpus_per_actor": 1, "actors": 2, "gpu_type": "A100-80GB"})
    totals = {"images": 400, "busy_s": 15.0, "actor_wall_s": 20.0}
    eff = efficiency.summarize(job, totals, tokens=12_800, wall_s=10.0, llm_config=ZIYA_LLM)
    assert eff["per"] == "GPU" and eff["devices"] == 2
    assert eff["output_tokens_per_s"] == 1280.0
    assert eff["output_tokens_per_s_per_device"] == 640.0
    assert eff["images_per_s_per_device"] == 20.0
    assert eff["busy_fraction"] == 0.75
    assert eff["prefix_cache_hit_rate"] is None  # transformers has no prefix cache
    # auto batch size: up to 256 prompts per generate call, bf16 on GPU
    bound = decode_bound("A100-80GB", llama_params(ZIYA_LLM), 2, 256)
    assert eff["decode_bound_tokens_per_s_per_gpu"] == pytest.approx(bound, abs=0.1)
    assert eff["roofline_fraction"] == pytest.approx(640.0 / bound, rel=1e-4)
    labels = dict(efficiency.rows(eff))
    assert labels["prefix-cache hit rate"] == "n/a"
    assert labels["images/s per GPU"] == "20.00"
    assert labels["decode roofline fraction"].endswith("(A100-80GB)")


def test_efficiency_section_vllm_and_cpu():
    job = _job(
        model={"engine": "vllm", "vllm": {"max_num_seqs": 64, "quantization": "fp8"}},
        resources={"gpus_per_actor": 1, "gpu_type": "L40S"},
    )
    totals = {"images": 10, "busy_s": 4.0, "actor_wall_s": 5.0}
    totals.update(prompt_tokens=400, cached_prompt_tokens=100)
    eff = efficiency.summarize(job, totals, tokens=640, wall_s=8.0, llm_config=ZIYA_LLM)
    assert eff["prefix_cache_hit_rate"] == 0.25 and eff["busy_fraction"] == 0.8
    assert eff["roofline_inputs"] == {
        "llm_params": llama_params(ZIYA_LLM),
        "bytes_per_param": 1,
        "sequences_per_step": 64,
    }
    # No GPUs, or no gpu_type: per model actor, and no roofline.
    cpu = efficiency.summarize(_job(resources={"actors": 2}), totals, 640, 8.0, ZIYA_LLM)
    assert cpu["per"] == "model actor" and cpu["devices"] == 2
    assert cpu["roofline_fraction"] is None and cpu["gpu_type"] is None
    assert dict(efficiency.rows(cpu))["decode roofline fraction"].startswith("n/a")
    unnamed = efficiency.summarize(_job(resources={"gpus_per_actor": 1}), totals, 640, 8.0)
    assert unnamed["roofline_fraction"] is None
    # A lost board: rates from the committed tokens still, the board's figures absent.
    lost = efficiency.summarize(job, None, 640, 8.0, ZIYA_LLM)
    assert lost["busy_fraction"] is None and lost["output_tokens_per_s"] == 80.0


def test_device_map_is_validated_as_configuration():
    """Configuration only: sharding over GPUs cannot run on a CPU."""
    job = _job(model={"device_map": "auto"}, resources={"gpus_per_actor": 2})
    assert job.model.device_map == "auto"
    assert _job().model.device_map == "none"
    with pytest.raises(JobConfigError, match=r"needs model\.device_map=auto"):
        _job(resources={"gpus_per_actor": 2})
    with pytest.raises(JobConfigError, match=r"gpus_per_actor >= 1"):
        _job(model={"device_map": "auto"})
    with pytest.raises(JobConfigError, match="tensor_parallel_size"):
        _job(model={"device_map": "auto", "engine": "vllm"}, resources={"gpus_per_actor": 2})
    with pytest.raises(JobConfigError, match="whole number"):
        _job(model={"device_map": "auto"}, resources={"gpus_per_actor": 1.5})


def test_device_map_reaches_load_ziya_as_configuration(monkeypatch, tmp_path):
    """Configuration only: the job's device_map is what the actor's loader passes on."""
    import ziya_model
    from pipeline.runtime.weights import ModelLoader

    seen = {}
    monkeypatch.setattr(ziya_model, "load_ziya", lambda *a, **kw: seen.update(kw))
    job = _job(
        model={"visual": str(tmp_path), "llm": str(tmp_path), "device_map": "auto"},
        resources={"gpus_per_actor": 2},
    )
    ModelLoader(job)()
    assert seen["device_map"] == "auto" and seen["device"] == "cuda"
    ModelLoader(_job(model={"visual": str(tmp_path), "llm": str(tmp_path)}))()
    assert seen["device_map"] == "none" and seen["device"] == "cpu"


def test_device_map_none_loads_on_cpu_and_auto_is_refused(tiny_checkpoint):
    """On CPU only device_map none makes sense; auto is refused before any weight is read."""
    from ziya_model import load_ziya

    model, _, _ = load_ziya(tiny_checkpoint.visual_dir, tiny_checkpoint.llm_dir, device_map="none")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(ValueError, match="needs device cuda"):
        load_ziya(tiny_checkpoint.visual_dir, tiny_checkpoint.llm_dir, device_map="auto")
    with pytest.raises(ValueError, match="device_map must be"):
        load_ziya(tiny_checkpoint.visual_dir, tiny_checkpoint.llm_dir, device_map="balanced")


def test_summary_reads_the_llm_config(tiny_checkpoint):
    job = _job(
        model={"visual": str(tiny_checkpoint.visual_dir), "llm": str(tiny_checkpoint.llm_dir)},
        resources={"gpus_per_actor": 1, "gpu_type": "H200"},
    )
    cfg = json.loads((tiny_checkpoint.llm_dir / "config.json").read_text())
    eff = efficiency.summarize(job, {}, tokens=100, wall_s=1.0)
    assert eff["roofline_inputs"]["llm_params"] == roofline.llama_params(cfg)


def test_report_shows_the_efficiency_figures(tmp_path):
    from pipeline.output.report import load_run, render
    from tests.support.run_layout import write_layout

    layout = write_layout(tmp_path / "out", tmp_path / "images")
    path = layout.out / "_summary.json"
    summary = json.loads(path.read_text())
    job = _job(resources={"gpus_per_actor": 1, "gpu_type": "H200"})
    totals = {"images": 24, "busy_s": 3.0, "actor_wall_s": 4.0}
    summary["efficiency"] = efficiency.summarize(job, totals, 126, 4.0, ZIYA_LLM)
    path.write_text(json.dumps(summary))
    text = render(load_run(str(layout.out), sample=8))
    assert "<th>images/s per GPU</th><td>6.00</td>" in text
    assert "<th>engine busy fraction</th><td>0.750</td>" in text
    assert "<th>prefix-cache hit rate</th><td>n/a</td>" in text
    assert "(H200)</td>" in text
