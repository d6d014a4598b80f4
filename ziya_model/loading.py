"""Loading Ziya-Visual safely: strict visual weights, a merged LLaMA, tokenizer and processor.

Safety rules (../shared/spec/reliability.md): safetensors first (memory-mapped); a `.bin` is a
pickle and is only ever read through `torch.load(weights_only=True)` on torch >= 2.6;
`trust_remote_code` is never passed; nothing is downloaded (`local_files_only=True`); when a
directory holds a `weights.sha256` manifest, every listed file's size and sha256 are checked.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from .configuration import image_size
from .modeling import ZiyaBlip2ForCausalLM
from .processing import ZiyaImageProcessor
from .tokenization import load_tokenizer

SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
MANIFEST_NAME = "weights.sha256"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded safely (pickle payload, old torch, bad checksum)."""


def _torch_at_least(major: int, minor: int) -> bool:
    version = torch.__version__.split("+")[0].split(".")
    return (int(version[0]), int(version[1])) >= (major, minor)


def require_safe_torch_load() -> None:
    """`torch.load(weights_only=True)` is only trusted on torch >= 2.6 (CVE-2025-32434)."""
    if not _torch_at_least(2, 6):
        raise UnsafeCheckpointError(
            f"refusing to read a .bin checkpoint with torch {torch.__version__}: "
            "torch.load(weights_only=True) is unsafe before torch 2.6 (CVE-2025-32434); "
            "upgrade torch or convert the file with `python -m ziya_model.convert` elsewhere"
        )


def safe_load_bin(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a `.bin` state dict without running any pickled code (tensors only)."""
    require_safe_torch_load()
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as err:
        raise UnsafeCheckpointError(
            f"refusing {path}: not a plain tensor state dict (weights_only load failed: "
            f"{str(err).splitlines()[0]})"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsafeCheckpointError(f"refusing {path}: expected a dict of tensors")
    return state


def visual_weights_file(visual_dir: str | Path) -> Path:
    """The visual checkpoint's weight file: `model.safetensors` if present, else the `.bin`."""
    visual_dir = Path(visual_dir)
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (visual_dir / name).is_file():
            return visual_dir / name
    raise FileNotFoundError(f"{visual_dir} holds neither {SAFETENSORS_NAME} nor {BIN_NAME}")


def _weight_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_weights_manifest(directory: str | Path) -> Path:
    """Write `weights.sha256` ({"files": {name: {"size", "sha256"}}}) for the weight files."""
    directory = Path(directory)
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _weight_files(directory)
    }
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps({"files": files}, indent=2, sort_keys=True) + "\n")
    return path


def verify_weights_manifest(directory: str | Path, *, check_hash: bool = True) -> bool:
    """Check sizes (and sha256 when `check_hash`) against `weights.sha256`, if the file exists.

    Returns whether a manifest was found; raises `UnsafeCheckpointError` on any mismatch.
    """
    directory = Path(directory)
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        return False
    entries = json.loads(manifest.read_text())["files"]
    for name, expected in sorted(entries.items()):
        path = directory / name
        if not path.is_file():
            raise UnsafeCheckpointError(f"{path} is listed in {manifest} but missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise UnsafeCheckpointError(f"{path}: size {size} != {expected['size']} in {manifest}")
        if check_hash and _sha256(path) != expected["sha256"]:
            raise UnsafeCheckpointError(f"{path}: sha256 differs from {manifest}")
    return True


def resolve_device(device: str) -> torch.device:
    """Device from "cpu" | "cuda" | "cuda:N" | "auto" (cuda when available)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no CUDA device")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """dtype from "fp32" | "fp16" | "bf16" | "auto" (GPU: bf16 if supported, else fp16; CPU: fp32)."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {[*_DTYPES, 'auto']}, got {dtype!r}")
    return _DTYPES[dtype]


def _check_bin_files(directory: Path) -> None:
    if not any(p.suffix == ".safetensors" for p in _weight_files(directory)) and any(
        p.suffix == ".bin" for p in _weight_files(directory)
    ):
        require_safe_torch_load()


def load_ziya(
    visual_dir: str | Path,
    llm_dir: str | Path,
    dtype: str = "fp32",
    device: str = "cpu",
    *,
    verify: bool | str = True,
    device_map: str | None = None,
) -> tuple[ZiyaBlip2ForCausalLM, PreTrainedTokenizerBase, ZiyaImageProcessor]:
    """Load model, tokenizer and image processor from a visual dir and a merged-LLaMA dir.

    The visual weights load strictly (any missing or unexpected key is an error listing them).
    `verify` checks each directory's `weights.sha256` manifest when one is present: True checks
    sizes and sha256 (reads every byte: ~1 min for the 30 GB release), "size" only sizes (for
    weights already hashed once after download), False nothing.

    `device_map="auto"` shards the language model's layers over every visible GPU with
    accelerate (`from_pretrained(device_map="auto")`, balanced by free memory); the vision
    encoder, Q-Former and projection go to the first GPU, where the LLM's embeddings are, and
    `generate` runs the layers where they lie. It needs `device` "cuda"/"auto" with a GPU; on
    CPU only `None`/"none" (the whole model on one device) makes sense.
    """
    visual_dir, llm_dir = Path(visual_dir), Path(llm_dir)
    target = resolve_device(device)
    sharded = _sharded(device_map, target)
    torch_dtype = resolve_dtype(dtype, target)
    weights = visual_weights_file(visual_dir)
    if verify not in (True, False, "size"):
        raise ValueError(f"verify must be True, False or 'size', got {verify!r}")
    if verify:
        for directory in (visual_dir, llm_dir):
            verify_weights_manifest(directory, check_hash=verify is True)
    _check_bin_files(llm_dir)
    if weights.suffix == ".bin":
        require_safe_torch_load()

    common: dict[str, Any] = {
        "dtype": torch_dtype,
        "attn_implementation": "sdpa",
        "local_files_only": True,
    }
    # On a GPU the LLaMA is materialized straight on the device (13 B params never sit in RAM).
    placement = "auto" if sharded else ({"": target} if target.type == "cuda" else None)
    language_model = LlamaForCausalLM.from_pretrained(str(llm_dir), device_map=placement, **common)
    try:
        model = ZiyaBlip2ForCausalLM.from_pretrained(
            str(visual_dir),
            language_model=language_model,
            use_safetensors=weights.suffix == ".safetensors",
            **common,
        )
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refusing {weights}: it is not a plain tensor state dict "
            f"(weights_only load failed: {str(err).splitlines()[0]})"
        ) from err
    if sharded:
        # The LLM stays where accelerate put it; the rest joins its embeddings' device.
        first = language_model.get_input_embeddings().weight.device
        for name in ("vision_model", "qformer", "language_projection"):
            getattr(model, name).to(first)
        model.query_tokens.data = model.query_tokens.data.to(first)
        model = model.eval()
    else:
        model = model.to(target).eval()
    tokenizer = load_tokenizer(llm_dir, language_model.config.pad_token_id)
    processor = ZiyaImageProcessor(image_size(model.config))
    return model, tokenizer, processor


def _sharded(device_map: str | None, target: torch.device) -> bool:
    """Whether `device_map` asks for the LLM sharded over the GPUs (only "auto" does)."""
    if device_map in (None, "none"):
        return False
    if device_map != "auto":
        raise ValueError(f"device_map must be None, 'none' or 'auto', got {device_map!r}")
    if target.type != "cuda":
        raise ValueError(
            "device_map='auto' shards the model over GPUs and needs device cuda (or auto with a "
            "GPU); on CPU use device_map=None"
        )
    return True


def model_identity(visual_dir: str | Path, llm_dir: str | Path) -> str:
    """A short stable name for output rows: dir names + hash of configs and weight file sizes.

    e.g. `ziya-visual:visual+llm@3f2a9c1d0b7e` (cheap: no weight bytes are hashed).
    """
    digest = hashlib.sha256()
    for directory in (Path(visual_dir), Path(llm_dir)):
        for name in ("config.json", MANIFEST_NAME):
            path = directory / name
            if path.is_file():
                digest.update(name.encode() + b"\0" + path.read_bytes())
        for weight in _weight_files(directory):
            digest.update(f"{weight.name}:{weight.stat().st_size}".encode())
    return f"ziya-visual:{Path(visual_dir).name}+{Path(llm_dir).name}@{digest.hexdigest()[:12]}"
