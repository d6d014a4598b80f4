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


def tiny_model(root: Path, image_size: int | None = None) -> tuple[str, str]:
    """The tiny checkpoint's (visual, llm) directories under `root`; with `image_size`, its vision
    config says that size (the driver reads it for preprocessing; small pixels keep the object
    store traffic small when a benchmark is about the driver)."""
    import json

    from ziya_model import write_tiny_checkpoint

    tiny = write_tiny_checkpoint(root)
    if image_size is not None:
        cfg_path = Path(tiny.visual_dir) / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.setdefault("vision_config", {})["image_size"] = image_size
        cfg_path.write_text(json.dumps(cfg))
    return str(tiny.visual_dir), str(tiny.llm_dir)


# The code before issue 15's rewrite (driver on the data path, every id in the driver's memory):
# the "before" side of bench_driver_cpu.py and bench_planning.py.
REFERENCE_COMMIT = "b07e379"


def reference_tree(path: str | None, commit: str = REFERENCE_COMMIT) -> Path:
    """A checkout of `commit`: `path` as given, else a git worktree at /tmp/ziya-ref (made on the
    first call, checked against `commit` on later ones)."""
    import subprocess

    if path:
        tree = Path(path).resolve()
        if not (tree / "pipeline" / "builder.py").is_file():
            raise SystemExit(f"--reference {tree}: no pipeline/builder.py there")
        return tree
    tree = Path("/tmp/ziya-ref")
    if not tree.exists():
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit],
            check=True,
            capture_output=True,
        )
    head = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    want = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", commit], capture_output=True, text=True, check=True
    ).stdout.strip()
    if head != want:
        raise SystemExit(f"{tree} is at {head or 'no commit'}, not {commit}: pass --reference DIR")
    return tree


def run_in_tree(tree: Path, script: str, args: list[str], label: str) -> dict:
    """Run `script --child ...` in a fresh process that imports `pipeline` (and `bench.standin`)
    from `tree`: the tree leads PYTHONPATH, so Ray's worker processes (which inherit the
    environment) import the same code, and is the working directory. The child writes its result
    as JSON to the file named by `--result`; a failure exits with the child's stderr."""
    import json
    import subprocess

    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        path = [str(tree), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        cmd = [sys.executable, script, "--child", str(tree), "--result", result.name, *args]
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
        out = Path(result.name).read_text()
        if proc.returncode != 0 or not out:
            raise SystemExit(
                f"{label} ({tree}) failed with exit code {proc.returncode}:\n{proc.stderr[-4000:]}"
            )
        return json.loads(out)


def tree_label(tree: Path) -> str:
    """`<short commit>[+changes]` of a checkout, for the printed table."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(tree), *args], capture_output=True, text=True, check=False
        ).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (
        "+changes" if git("status", "--porcelain", "--", "pipeline") else ""
    )
