"""Hardening (issue 7): hostile images, paths, model files, credentials and questions.

    python -m pytest tests/test_hardening.py -q

Real parts throughout: local Ray (`ray_cluster`), a moto S3 server on 127.0.0.1, the tiny
checkpoint, Pillow-made images, real Parquet. Each test asserts exact figures.
1. mixed good and bad images through `ziya-batch run`: exit 0, every row once, exact statuses,
   EXIF rotation applied;
2. decompression bombs: `too_large` with peak memory growth measured in a fresh process;
3. hostile paths: `invalid_path`, and no request (storage proxy log, socket/open audit spy);
4. a `.bin` carrying a pickle payload: refused, the payload never runs;
5. canary credentials: absent from every Ray log, output file and error after storage errors;
6. hostile questions and pass-through strings (invalid UTF-8, lone surrogates): the write
   succeeds and every row is `ok` or `invalid_question`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections import Counter
from pathlib import Path
from urllib.parse import quote, quote_plus

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from jobs.cli import main as cli_main
from pipeline.builder import default_policy, run
from pipeline.config import parse_job
from pipeline.layout import read_output
from pipeline.locations import LocationPolicy
from pipeline.manifest import plan
from pipeline.stages.fetch import FetchStage
from pipeline.stages.preprocess import PreprocessStage
from pipeline.stages.read import ReadStage
from pipeline.storage import filesystem
from pipeline.weights import ModelLoader
from tests.support import hostile as h
from tests.support.faultproxy import FaultProxy
from tests.support.s3 import create_bucket, put_bytes, upload_dir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _photo(photo_dir: Path, name: str, size: int = 128) -> Image.Image:
    return Image.open(photo_dir / f"{name}.jpg").convert("RGB").resize((size, size))


def _pixels(images: list[bytes], max_pixels: int = 64_000_000) -> list[bytes | None]:
    batch = pa.table(
        {
            "image_bytes": pa.array(images, pa.binary()),
            "status": ["ok"] * len(images),
            "error": pa.array([None] * len(images), pa.string()),
        }
    )
    return PreprocessStage(224, max_pixels)(batch).column("pixels").to_pylist()


# -- 1. every kind of image ----------------------------------------------------------------------
def test_mixed_images_job_exits_0_with_exact_statuses(
    ray_cluster, moto_endpoint, photo_dir, tiny_checkpoint, tmp_path
):
    bucket = "hard-mixed"
    create_bucket(moto_endpoint, bucket)
    photo = _photo(photo_dir, "chelsea")
    rotated = h.exif_rotated_jpeg(h.pattern(160, 96))
    gif, first_colour = h.animated_gif()
    good_jpg = (photo_dir / "astronaut.jpg").read_bytes()
    limit = 3_000_000
    bomb = h.png_bomb(30000, 30000)
    assert len(bomb) < limit  # the bomb passes the byte limit: only its header gives it away
    objects = {
        "astronaut.jpg": good_jpg,
        "coffee.jpg": (photo_dir / "coffee.jpg").read_bytes(),
        "rocket.jpg": (photo_dir / "rocket.jpg").read_bytes(),
        "png-named.jpg": h.png_named_jpg(photo),
        "cmyk.jpg": h.cmyk_jpeg(photo),
        "palette-transparent.png": h.palette_png_with_transparency(photo),
        "gray16.png": h.png_16bit(),
        "rgba.png": h.rgba_png(photo),
        "exif-rotated.jpg": rotated,
        "upright.png": h.upright_png(rotated),
        "animated.gif": gif,
        "one-pixel.png": h.one_pixel(),
        "wide-10000x3.png": h.extreme_aspect(10000, 3),
        "tall-3x10000.png": h.extreme_aspect(3, 10000),
        "truncated.jpg": h.truncated(good_jpg),
        "zero.jpg": b"",
        "random.jpg": h.random_bytes(4096, seed=1),
        "bomb.png": bomb,
        "oversize.jpg": h.random_bytes(limit + 500_000, seed=2),
    }
    for name, data in objects.items():
        put_bytes(moto_endpoint, bucket, f"images/{name}", data)
    expected = {name: "ok" for name in list(objects)[:14]}
    expected.update(
        {
            "truncated.jpg": "decode_error",
            "zero.jpg": "decode_error",
            "random.jpg": "decode_error",
            "bomb.png": "too_large",
            "oversize.jpg": "too_large",
            "missing.jpg": "fetch_error",
        }
    )
    uris = {name: f"s3://{bucket}/images/{name}" for name in expected}
    uris["elsewhere.jpg"] = f"s3://{bucket}-other/images/astronaut.jpg"  # another bucket
    expected["elsewhere.jpg"] = "invalid_path"
    names = sorted(uris)
    manifest = pa.table({"id": names, "image": [uris[n] for n in names]})
    put_bytes(moto_endpoint, bucket, "manifests/mixed.parquet", _parquet(manifest))

    job = {
        "name": "hardening-mixed",
        "input": {"uri": f"s3://{bucket}/manifests/mixed.parquet"},
        "output": {"uri": f"s3://{bucket}/out", "rows_per_shard": 8},
        "model": {"visual": str(tiny_checkpoint.visual_dir), "llm": str(tiny_checkpoint.llm_dir)},
        "generation": {"max_new_tokens": 4},
        "resources": {"batch_size": 8, "preprocess_batch_size": 8},
        "storage": {"endpoint_url": moto_endpoint, "retries": 1},
        "limits": {"max_image_bytes": limit},
    }
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    assert cli_main(["run", str(job_file), "--quiet"]) == 0

    out = read_output(f"s3://{bucket}/out")
    ids = out.column("id").to_pylist()
    assert out.num_rows == len(names) == 21 and sorted(ids) == names  # each row exactly once
    got = dict(zip(ids, out.column("status").to_pylist(), strict=True))
    assert got == expected
    assert Counter(got.values()) == {
        "ok": 14,
        "decode_error": 3,
        "too_large": 2,
        "fetch_error": 1,
        "invalid_path": 1,
    }
    rows = {r["id"]: r for r in out.to_pylist()}
    assert "exceeds limit" in rows["bomb.png"]["error"] or "too large" in rows["bomb.png"]["error"]
    assert f"{limit + 500_000} bytes > limit {limit}" in rows["oversize.jpg"]["error"]
    assert all((r["answer"] is not None) == (r["status"] == "ok") for r in rows.values())
    fs, path = filesystem(f"s3://{bucket}/out/summary.json")
    summary = json.loads(fs.cat_file(path))
    assert summary["rows_in"] == summary["rows_out"] == 21

    # Rotated images come out rotated: the EXIF-rotated JPEG gives the same pixels as the
    # upright PNG (and not those of its stored, unrotated pixels), so the same greedy answer.
    stored = h.stored_png(rotated)
    px_rotated, px_upright, px_stored, px_gif = _pixels(
        [rotated, objects["upright.png"], stored, gif]
    )
    assert px_rotated == px_upright and px_rotated != px_stored
    assert rows["exif-rotated.jpg"]["answer"] == rows["upright.png"]["answer"]
    # Animated: the first frame (pure red after resizing).
    assert set(px_gif[: 224 * 224]) == {first_colour[0]} and set(px_gif[224 * 224 :]) == {0}


# -- 2. decompression bombs ----------------------------------------------------------------------
_MEASURE = textwrap.dedent(
    """
    import json, sys
    import pyarrow as pa
    from pipeline.stages.preprocess import PreprocessStage

    def peak_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    stage = PreprocessStage(224, int(sys.argv[1]))
    def one(data):
        batch = pa.table({"image_bytes": pa.array([data], pa.binary()), "status": ["ok"],
                          "error": pa.array([None], pa.string())})
        before = peak_kb()
        out = stage(batch).to_pylist()[0]
        return {"status": out["status"], "error": out["error"],
                "growth_mb": (peak_kb() - before) / 1024}
    one(open(sys.argv[2], "rb").read())  # warm-up: lazy imports and allocator pools
    print(json.dumps([one(open(p, "rb").read()) for p in sys.argv[3:]]))
    """
)


def test_decompression_bomb_is_too_large_with_bounded_memory(tmp_path, photo_dir):
    max_pixels = 64_000_000  # the job default
    files = {
        "warm.jpg": (photo_dir / "coffee.jpg").read_bytes(),
        # 2.6 MB on disk, 30000x30000 RGB = 2.7 GB decoded (beyond Pillow's own bomb limit).
        "bomb-huge.png": h.png_bomb(30000, 30000),
        # 9000x9000 = 81 M pixels: under Pillow's limit, over ours; 243 MB decoded.
        "bomb-81mp.png": h.png_bomb(9000, 9000),
        # Control: a legitimate 5000x4000 image (60 MB decoded) shows the probe sees allocations.
        "control-20mp.png": h.png_bomb(5000, 4000),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert len(files["bomb-huge.png"]) < 3_000_000
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(max_pixels), *(str(tmp_path / n) for n in files)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    huge, mp81, control = json.loads(proc.stdout.strip().splitlines()[-1])
    assert huge["status"] == "too_large" and "900000000 pixels" in huge["error"]
    assert mp81["status"] == "too_large"
    assert "9000x9000 = 81000000 pixels > limit 64000000" in mp81["error"]
    # Decoding either bomb would need 243 MB to 2.7 GB; the header check keeps growth tiny.
    assert huge["growth_mb"] < 50 and mp81["growth_mb"] < 50, (huge, mp81)
    assert control["status"] == "ok" and control["growth_mb"] > 50, control
    print(
        f"peak RSS growth MB: bomb 2.7GB {huge['growth_mb']:.1f}, bomb 243MB "
        f"{mp81['growth_mb']:.1f}, control 60MB {control['growth_mb']:.1f}"
    )
