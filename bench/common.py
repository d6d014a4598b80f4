"""Shared helpers for the pipeline benchmarks: photo files, manifests, a local Ray.

Not an entrypoint. The photos are scikit-image's real photographs with small variations (crop
window, mirror, brightness), saved as JPEG files, so every file differs and decoding does real
work; nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "camera", "coins", "motorcycle_left")


def make_photos(folder: Path, count: int, size: tuple[int, int] = (640, 480)) -> list[Path]:
    """`count` distinct JPEG files (quality 90) of `size`, varied from skimage's photographs."""
    from PIL import Image, ImageEnhance
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    bases = []
    for name in PHOTOS:
        try:
            bases.append(Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB"))
        except Exception:  # a photo that needs an optional download: skip it
            continue
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        img = bases[i % len(bases)]
        w, h = img.size
        # A random crop of 80-100% of each side, an optional mirror, brightness +-15%.
        cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out = img.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out = ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.85, 1.15)))
        path = folder / f"photo-{i:05d}.jpg"
        out.save(path, quality=90)
        paths.append(path)
    return paths


def write_manifest(
    path: Path, images: list[Path], rows: int, questions: list[str] | None = None
) -> Path:
    """A manifest of `rows` rows cycling over `images` (local paths), optionally with questions."""
    uris = [str(images[i % len(images)].resolve()) for i in range(rows)]
    columns: dict = {"id": [f"row-{i:07d}" for i in range(rows)], "image": uris}
    if questions is not None:
        columns["questions"] = [list(questions)] * rows
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def init_ray(num_cpus: int | None = None) -> None:
    """A local Ray with token auth off, no dashboard, quiet logs, a temp dir of its own."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    import bench.standin

    # Workers cannot import bench/ (it is not an installed package): ship the stand-in by value.
    ray.cloudpickle.register_pickle_by_value(bench.standin)
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="ray-bench-"),
        log_to_driver=False,
        configure_logging=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray", "ray.data", "ziya_batch"):
        logging.getLogger(name).setLevel(logging.WARNING)


def wait_idle(seconds: float = 1.0) -> None:
    """Let workers of the previous run exit before timing the next one."""
    time.sleep(seconds)


def machine() -> str:
    import platform

    load = os.getloadavg()
    return (
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"load average {load[0]:.1f} at start"
    )
