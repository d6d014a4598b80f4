"""Preprocessing throughput per CPU core: the fast path vs transformers' BlipImageProcessor.

    python bench/bench_preprocess.py [--rounds 20] [--size 224]

Same JPEGs for every method: scikit-image's real photographs resized to 640x480 and saved as
JPEG (quality 90). Everything runs on one thread (torch, and Pillow is single-threaded), so the
figures are images/s per core, decode included, all measured in this one run (best pass of
`--rounds`, methods interleaved):
  reference   Image.open + load + BlipImageProcessor(size=S x S, PIL backend) -> float32
  exact       decode_image + ZiyaImageProcessor.__call__ (the exact reference mode) -> float32
  fast        decode_pixels(min_size=S) (libjpeg-turbo at reduced DCT scale, via simplejpeg)
              + preprocess_uint8 (torch uint8 bicubic antialiased resize) -> uint8 [3,S,S]
              (what is shipped);
              normalization then runs batched on the model's device (timed separately on CPU)
It also prints the fast path's mean/max abs difference from the reference in normalized units
and the bytes per image shipped to the model actors (uint8 vs float32).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ziya_model.processing import ZiyaImageProcessor, decode_image, decode_pixels

PHOTOS = [
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle_left",
]


def make_jpegs(folder: Path) -> list[bytes]:
    """skimage photos -> 640x480 RGB JPEGs (quality 90), as bytes."""
    blobs = []
    for name in PHOTOS:
        try:
            arr = getattr(data, name)()
        except Exception:  # some images need optional downloads (pooch); skip those
            continue
        img = Image.fromarray(np.asarray(arr)).convert("RGB").resize((640, 480), Image.BICUBIC)
        path = folder / f"{name}.jpg"
        img.save(path, quality=90)
        blobs.append(path.read_bytes())
    return blobs


def throughput(
    methods: dict[str, Callable[[bytes], object]], blobs: list[bytes], rounds: int
) -> dict[str, float]:
    """Images/s per method: best pass of `rounds`, methods interleaved within each round so a
    busy machine slows them alike (after one warm-up pass each)."""
    best = dict.fromkeys(methods, float("inf"))
    for fn in methods.values():
        for blob in blobs:
            fn(blob)
    for _ in range(rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            for blob in blobs:
                fn(blob)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(blobs) / seconds for name, seconds in best.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    from transformers import BlipImageProcessor

    size = args.size
    reference = BlipImageProcessor(size={"height": size, "width": size})
    ours = ZiyaImageProcessor(size)
    with tempfile.TemporaryDirectory() as tmp:
        blobs = make_jpegs(Path(tmp))

    def run_reference(blob: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(blob)) as img:
            img.load()
            return reference(img, return_tensors="np")["pixel_values"]

    def run_exact(blob: bytes) -> torch.Tensor:
        return ours(decode_image(blob))

    def run_fast(blob: bytes) -> np.ndarray:
        return ours.preprocess_uint8(decode_pixels(blob, min_size=size))

    rates = throughput(
        {"reference": run_reference, "exact": run_exact, "fast": run_fast}, blobs, args.rounds
    )
    # Normalization of the shipped uint8 batch, as the model actor does it (here on CPU).
    batch = torch.from_numpy(np.stack([run_fast(b) for b in blobs]))
    start = time.perf_counter()
    for _ in range(args.rounds * 10):
        ours.normalize(batch, torch.float32)
    norm_rate = args.rounds * 10 * len(blobs) / (time.perf_counter() - start)

    diffs = []
    for blob in blobs:
        ref = torch.from_numpy(run_reference(blob))
        fast = ours.normalize(torch.from_numpy(run_fast(blob)), torch.float32)
        diffs.append((fast - ref).abs())
    mean_diff = float(torch.stack([d.mean() for d in diffs]).mean())
    max_diff = float(max(d.max() for d in diffs))
    exact_diff = max(
        float((run_exact(b) - torch.from_numpy(run_reference(b))).abs().max()) for b in blobs
    )
    uint8_bytes, float_bytes = 3 * size * size, 3 * size * size * 4

    print(
        f"images: {len(blobs)} JPEGs of 640x480, best of {args.rounds} interleaved rounds, "
        f"1 thread, S={size}"
    )
    for name, rate in rates.items():
        print(f"  {name:<10} {rate:8.1f} images/s per core")
    print(f"  normalize  {norm_rate:8.1f} images/s per core (uint8 -> float32, batched, CPU)")
    print(f"fast / reference speed-up: {rates['fast'] / rates['reference']:.2f}x (target >= 4x)")
    print(f"exact / reference speed-up: {rates['exact'] / rates['reference']:.2f}x")
    print(f"exact mode max abs diff vs reference: {exact_diff:.2e}")
    print(
        f"fast path vs reference, normalized units: mean abs {mean_diff:.4f}, max abs {max_diff:.3f}"
    )
    print(
        f"bytes per image shipped: uint8 {uint8_bytes} vs float32 {float_bytes} "
        f"({uint8_bytes / float_bytes:.2f} of float32)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
