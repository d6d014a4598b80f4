"""Convert the released visual `pytorch_model.bin` into `model.safetensors` (no pickles on clusters).

    python -m ziya_model.convert VISUAL_DIR [--force]

Reads the pickle only through `torch.load(weights_only=True)` (torch >= 2.6), writes
`VISUAL_DIR/model.safetensors`, checks that every tensor round-trips bit-exactly, refreshes
`VISUAL_DIR/weights.sha256`, and prints the new file's size and sha256. The loader prefers the
safetensors file from then on; the `.bin` can be left out of what clusters download.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .loading import (
    BIN_NAME,
    MANIFEST_NAME,
    SAFETENSORS_NAME,
    _sha256,
    safe_load_bin,
    write_weights_manifest,
)


def convert(visual_dir: str | Path, force: bool = False) -> dict[str, object]:
    """Write `model.safetensors` from `pytorch_model.bin`; return path, size, sha256, tensors."""
    visual_dir = Path(visual_dir)
    source, target = visual_dir / BIN_NAME, visual_dir / SAFETENSORS_NAME
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to overwrite")
    state = safe_load_bin(source)
    # safetensors refuses tensors that share storage; copy only those.
    seen: set[tuple[int, int]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        tensor = tensor.contiguous()
        tensors[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    tmp = target.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    with safe_open(str(tmp), framework="pt") as reloaded:
        if set(reloaded.keys()) != set(tensors):
            raise RuntimeError("safetensors file lost or gained keys during conversion")
        for name, tensor in tensors.items():
            if not torch.equal(reloaded.get_tensor(name), tensor):
                raise RuntimeError(f"tensor {name} changed during conversion")
    tmp.replace(target)
    write_weights_manifest(visual_dir)
    return {
        "path": str(target),
        "size": target.stat().st_size,
        "sha256": _sha256(target),
        "tensors": len(tensors),
        "manifest": str(visual_dir / MANIFEST_NAME),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("visual_dir", type=Path)
    parser.add_argument("--force", action="store_true", help="overwrite model.safetensors")
    args = parser.parse_args(argv)
    print(json.dumps(convert(args.visual_dir, force=args.force), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
