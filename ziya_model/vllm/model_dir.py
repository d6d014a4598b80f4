"""The model directory vLLM loads Ziya-Visual from, built from the two released directories.

vLLM loads one directory: a `config.json` naming the architecture, the weights and a tokenizer.
The release ships two (the visual checkpoint and the merged Ziya-LLaMA), so this module writes a
third that holds only small files of its own and links to the others' weights:

    OUT/config.json                    the visual config.json, its `text_config` replaced by the
                                       LLM's config.json, `architectures` set to the plugin's
                                       class, and `image_token_index` (the placeholder id)
    OUT/model.safetensors.index.json   every tensor of both directories -> its link below
    OUT/visual--<file>                 symlink to each visual weight file
    OUT/llm--<file>                    symlink to each LLM weight file
    OUT/<tokenizer files>              symlinks to the LLM's tokenizer files

No weight byte is copied or read (the index is built from the safetensors headers). The LLM's
`model.*` / `lm_head.*` names are mapped under `language_model.` by the plugin at load time.
Only safetensors are linked: vLLM picks `.safetensors` over `.bin` when a directory has both,
so a mixed pair would silently lose one half; a `.bin` directory gets a message saying how to
convert it. `generation_config.json` is left out on purpose: vLLM would otherwise take its
sampling defaults from it, and the job's generation settings are the only ones that apply.

The directory's name is a hash of its inputs (both directories' paths and config files, the
weight files' names and sizes), so rebuilding for the same model is a no-op and a changed model gets a new directory.
This module imports neither vLLM nor torch: the driver and tests can call it anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

ARCHITECTURE = "ZiyaVisualForConditionalGeneration"
INDEX_NAME = "model.safetensors.index.json"
# Files of the LLM directory the tokenizer needs (the rest are weights, configs or manifests).
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
# Bumped when the layout written here changes, so old directories are not reused.
LAYOUT_VERSION = "1"


class ModelDirError(ValueError):
    """The two directories cannot be turned into a vLLM model directory (message says why)."""


def _safetensors_names(path: Path) -> list[str]:
    """Tensor names in a safetensors file, read from its JSON header only."""
    with path.open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    return sorted(k for k in header if k != "__metadata__")


def _weight_files(directory: Path, what: str, fix: str) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    if any(directory.glob("*.bin")):
        raise ModelDirError(
            f"{what} {directory} holds only .bin weights; the vLLM engine loads safetensors "
            f"only (no pickles on clusters): {fix}"
        )
    raise ModelDirError(f"{what} {directory} holds no weight files")


def _placeholder_id(llm_config: dict) -> int:
    """The token id that marks the image's 32 positions in a prompt.

    The pad id (Ziya: 0, `<unk>`): it is inside the vocabulary (vLLM validates prompt ids
    against it) and a run of 32 of them never comes out of tokenizing text, so the plugin's
    32-token match finds the image and nothing else. Its embedding is never used: the image
    embeddings replace those positions.
    """
    pad = llm_config.get("pad_token_id")
    return int(pad) if pad is not None else 0


def model_dir_key(visual_dir: Path, llm_dir: Path) -> str:
    """Hash of what the directory is built from (paths, configs, weight names and sizes)."""
    digest = hashlib.sha256(LAYOUT_VERSION.encode())
    for directory in (visual_dir, llm_dir):
        # The links point into these directories, so they are part of the key.
        digest.update(str(directory).encode() + b"\0")
        digest.update((directory / "config.json").read_bytes())
        for path in sorted(directory.glob("*.safetensors")):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
        for name in TOKENIZER_FILES:
            path = directory / name
            if path.is_file():
                digest.update(f"{name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def build_model_dir(
    visual_dir: str | Path,
    llm_dir: str | Path,
    cache_dir: str | Path | None = None,
    *,
    weights: bool = True,
) -> Path:
    """Build (or reuse) the vLLM model directory for a visual dir and a merged-LLM dir.

    Returns `cache_dir/ziya-vllm-<hash>` (default cache: the system temp dir). Written under a
    temporary name and renamed, so a directory that exists is complete. `weights=False` writes
    configs and tokenizer only (for vLLM's `load_format="dummy"`: random weights).
    """
    visual_dir, llm_dir = Path(visual_dir).resolve(), Path(llm_dir).resolve()
    for what, directory in (("visual directory", visual_dir), ("LLM directory", llm_dir)):
        if not (directory / "config.json").is_file():
            raise ModelDirError(f"{what} {directory} has no config.json")
    root = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir())
    target = root / f"ziya-vllm-{model_dir_key(visual_dir, llm_dir)}{'' if weights else '-dummy'}"
    if (target / "config.json").is_file():
        return target

    visual_files = weights and _weight_files(
        visual_dir,
        "visual directory",
        f"run `python -m ziya_model.convert {visual_dir}` once to write model.safetensors",
    )
    llm_files = weights and _weight_files(
        llm_dir,
        "LLM directory",
        "save the merged LLM with save_pretrained(..., safe_serialization=True)",
    )
    visual_config = json.loads((visual_dir / "config.json").read_text())
    llm_config = json.loads((llm_dir / "config.json").read_text())
    if llm_config.get("model_type") != "llama":
        raise ModelDirError(
            f"LLM directory {llm_dir}: config.json has model_type "
            f"{llm_config.get('model_type')!r}, expected 'llama' (the merged Ziya-LLaMA)"
        )
    config = dict(visual_config)
    config["text_config"] = llm_config
    config["architectures"] = [ARCHITECTURE]
    config["image_token_index"] = _placeholder_id(llm_config)

    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=root))
    try:
        weight_map: dict[str, str] = {}
        for prefix, files in (("visual--", visual_files or []), ("llm--", llm_files or [])):
            for path in files:
                link = prefix + path.name
                os.symlink(path, partial / link)
                for name in _safetensors_names(path):
                    if name in weight_map:
                        raise ModelDirError(
                            f"tensor {name!r} is in both {weight_map[name]} and {link}: the "
                            "visual and LLM directories overlap"
                        )
                    weight_map[name] = link
        for name in TOKENIZER_FILES:
            if (llm_dir / name).is_file():
                os.symlink(llm_dir / name, partial / name)
        (partial / INDEX_NAME).write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1, sort_keys=True)
        )
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        try:
            partial.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent builder's win
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target
