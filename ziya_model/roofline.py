"""The decode roofline: one table of GPUs, and the bound a decode step cannot beat.

Used by the pipeline's run summary (`resources.gpu_type`, pipeline/runtime/efficiency.py) and by
bench/gpu_check.py; nothing here imports Ray or torch.

Definition (consistent with the roofline section of shared/spec/ziya-visual.md). One decode
step advances every running sequence by one token. It must read every weight of the language
model once (bytes = parameters x bytes per parameter; 26 GB for the 13B LLaMA in bf16) and does
about 2 x parameters FLOPs per sequence (attention over the KV cache is left out: small next to
the weights for 64-token captions). So, per GPU:

    decode bound (output tokens/s) = min(S x bandwidth / weight bytes,  bf16 peak / (2 x params))

with S the sequences per step the job allows (the transformers engine's prompts per generate
call x beams, vLLM's `max_num_seqs`): weight-bandwidth-bound for small S, compute-bound once S
reaches peak x bytes / (2 x bandwidth) (~150 sequences on an H100 SXM in bf16). The roofline
fraction is the measured output tokens/s per GPU over that bound. S is the job's cap, not the
batch actually reached, so the fraction is conservative: a run whose batches stay small is
shown far from the bound, which is what it is. A model sharded over G GPUs (tensor parallel,
or accelerate's device_map) has G times the bandwidth and FLOPs per replica, so the per-GPU
figure is unchanged and G drops out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GPUSpec:
    bandwidth_tb_s: float  # memory bandwidth, TB/s (10^12 bytes/s)
    bf16_tflops: float  # dense bf16 tensor-core peak, TFLOP/s (no 2:4 sparsity)
    memory_gib: int  # device memory as sold (GB)


# Vendor datasheet figures; dense bf16 (the "with sparsity" figures are twice these).
# Sources: NVIDIA H100 datasheet (SXM5 / PCIe), H200 datasheet (SXM), A100 datasheet (SXM4 40
# and 80 GB), L40S datasheet, L4 datasheet, A10 datasheet (A10G: AWS's A10 variant; AWS gives
# no tensor figure, 70 TFLOP/s is the figure commonly quoted for it: approximate), Ada
# architecture whitepaper (RTX 4090: bf16 with fp32 accumulate, 165.2 dense).
GPUS: dict[str, GPUSpec] = {
    "H100-SXM": GPUSpec(3.35, 989.0, 80),
    "H100-PCIe": GPUSpec(2.0, 756.0, 80),
    "H200": GPUSpec(4.8, 989.0, 141),
    "A100-40GB": GPUSpec(1.555, 312.0, 40),
    "A100-80GB": GPUSpec(2.039, 312.0, 80),
    "L40S": GPUSpec(0.864, 362.0, 48),
    "L4": GPUSpec(0.3, 121.0, 24),
    "A10G": GPUSpec(0.6, 70.0, 24),
    "RTX-4090": GPUSpec(1.008, 165.2, 24),
}
GPU_TYPES = tuple(GPUS)

# Bytes per weight as the engines hold them (fp8: vLLM's weight quantization).
BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}


def gpu_type_of(device_name: str) -> str | None:
    """The table's name for a CUDA device name (`torch.cuda.get_device_name`), or None."""
    n = device_name.upper().replace("_", " ")
    if "H200" in n:
        return "H200"
    if "H100" in n:
        return "H100-PCIe" if "PCIE" in n else "H100-SXM"
    if "A100" in n:
        return "A100-80GB" if "80G" in n else "A100-40GB"
    if "L40S" in n:
        return "L40S"
    if "A10G" in n:
        return "A10G"
    if "4090" in n:
        return "RTX-4090"
    if n.rstrip().endswith(" L4") or n == "L4":
        return "L4"
    return None


def llama_params(cfg: dict[str, Any]) -> int:
    """Parameters of a LLaMA language model from its config.json (embeddings and head included)."""
    h, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    inter, vocab = int(cfg["intermediate_size"]), int(cfg["vocab_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    attention = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim  # q, o; k, v
    per_layer = attention + 3 * h * inter + 2 * h  # gate/up/down, two norms
    head = 0 if cfg.get("tie_word_embeddings") else vocab * h
    return vocab * h + layers * per_layer + h + head


def decode_bound(
    gpu_type: str, params: int, bytes_per_param: float, sequences_per_step: int
) -> float:
    """Output tokens/s one GPU cannot exceed when decoding (see the module docstring)."""
    spec = GPUS[gpu_type]
    bandwidth = sequences_per_step * spec.bandwidth_tb_s * 1e12 / (params * bytes_per_param)
    compute = spec.bf16_tflops * 1e12 / (2 * params)
    return min(bandwidth, compute)


def roofline_fraction(
    tokens_per_s_per_gpu: float,
    gpu_type: str,
    params: int,
    bytes_per_param: float,
    sequences_per_step: int,
) -> float:
    """Measured output tokens/s per GPU over `decode_bound`."""
    return tokens_per_s_per_gpu / decode_bound(
        gpu_type, params, bytes_per_param, sequences_per_step
    )
