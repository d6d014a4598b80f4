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
from pipeline.guards.locations import LocationPolicy
from pipeline.output.layout import read_output
from pipeline.planning.manifest import plan
from pipeline.runtime.weights import ModelLoader
from pipeline.stages.fetch import FetchStage
from pipeline.stages.preprocess import PreprocessStage
from pipeline.stages.read import OUTPUT_SCHEMA as READ_SCHEMA
from pipeline.stages.read import ReadStage
from pipeline.storage import filesystem
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
    assert "900000000 pixels" in rows["bomb.png"]["error"]
    assert f"{limit + 500_000} bytes > limit {limit}" in rows["oversize.jpg"]["error"]
    assert all((r["answer"] is not None) == (r["status"] == "ok") for r in rows.values())
    fs, path = filesystem(f"s3://{bucket}/out/_summary.json")
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


# -- 3. hostile paths ----------------------------------------------------------------------------
PATHS_BUCKET = "hard-paths"


@pytest.fixture(scope="module")
def paths_world(moto_endpoint, photo_dir, tmp_path_factory):
    """Objects the hostile paths point at (so a fetch would succeed), a storage proxy that logs
    every request, and a redirector on 127.0.0.1."""
    photo = (photo_dir / "coffee.jpg").read_bytes()
    root = tmp_path_factory.mktemp("paths")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "good.jpg").write_bytes(photo)
    (outside / "evil.jpg").write_bytes(photo)
    (allowed / "link-evil.jpg").symlink_to(outside / "evil.jpg")
    b = PATHS_BUCKET
    create_bucket(moto_endpoint, b)
    create_bucket(moto_endpoint, "hard-evil-bucket")
    for bucket, key in [
        (b, "images/good.jpg"),
        (b, "private/evil.jpg"),
        (b, "images-evil/evil.jpg"),
        (b, "images/evil.jpg"),
        ("hard-evil-bucket", "images/evil.jpg"),
    ]:
        put_bytes(moto_endpoint, bucket, key, photo)
    with FaultProxy(moto_endpoint) as proxy:
        port = proxy.url.rsplit(":", 1)[1]
        target = f"{proxy.url}/{b}/images/evil-redirected.jpg"
        with h.redirector({"/evil-redirect": target}) as redirect:
            hostile = {
                "file-uri": f"file://{outside}/evil.jpg",
                "local-outside": f"{outside}/evil.jpg",
                "local-dotdot": f"{allowed}/../outside/evil.jpg",
                "local-symlink": f"{allowed}/link-evil.jpg",
                "etc-passwd": "/etc/passwd",
                "other-bucket": "s3://hard-evil-bucket/images/evil.jpg",
                "other-prefix": f"s3://{b}/private/evil.jpg",
                "sibling-prefix": f"s3://{b}/images-evil/evil.jpg",
                "dotdot": f"s3://{b}/images/../private/evil.jpg",
                "encoded-dotdot": f"s3://{b}/images/%2e%2e/private/evil.jpg",
                "double-encoded": f"s3://{b}/images/%252e%252e/private/evil.jpg",
                "encoded-slash": f"s3://{b}/images/..%2fprivate/evil.jpg",
                "backslashes": f"s3://{b}/images\\..\\private\\evil.jpg",
                "over-long": f"s3://{b}/images/{'a' * 1100}-evil.jpg",
                "nul-byte": f"s3://{b}/images/evil.jpg\x00.png",
                "gs-scheme": f"gs://{b}/images/evil.jpg",
                "metadata": "http://169.254.169.254/latest/meta-data/evil",
                "loopback-storage": f"http://127.0.0.1:{port}/{b}/images/evil.jpg",
                "ipv6-loopback": f"http://[::1]:{port}/{b}/images/evil.jpg",
                "decimal-ip": f"http://2130706433:{port}/{b}/images/evil.jpg",
                "hex-ip": f"http://0x7f.1:{port}/{b}/images/evil.jpg",
                "localhost": f"http://localhost:{port}/{b}/images/evil.jpg",
                "private-net": "https://10.0.0.1/evil.jpg",
                "redirector": f"{redirect.url}/evil-redirect",
            }
            good = {"s3": f"s3://{b}/images/good.jpg", "local": f"{allowed}/good.jpg"}
            uris = {f"hostile-{k}": v for k, v in hostile.items()}
            uris.update({f"good-{k}": v for k, v in good.items()})
            ids = sorted(uris)
            manifest = pa.table({"id": ids, "image": [uris[i] for i in ids]})
            put_bytes(moto_endpoint, b, "manifests/paths.parquet", _parquet(manifest))
            yield {
                "proxy": proxy,
                "redirect": redirect,
                "uris": uris,
                "allowed": allowed,
                "outside": outside,
                "photo": photo,
            }


def _paths_job(world, tiny_checkpoint, allow_http: bool, out: str):
    return parse_job(
        {
            "name": "hardening-paths",
            "input": {"uri": f"s3://{PATHS_BUCKET}/manifests/paths.parquet"},
            "output": {"uri": f"s3://{PATHS_BUCKET}/out/{out}", "rows_per_shard": 16},
            "model": {
                "visual": str(tiny_checkpoint.visual_dir),
                "llm": str(tiny_checkpoint.llm_dir),
            },
            "generation": {"max_new_tokens": 2},
            "resources": {"batch_size": 8},
            "storage": {"endpoint_url": world["proxy"].url, "retries": 0},
            "limits": {
                "allowed_locations": [f"s3://{PATHS_BUCKET}/images/", f"{world['allowed']}/"],
                "allow_http": allow_http,
            },
        }
    )


def _is_evil_open(path: str) -> bool:
    return "evil" in path or path == "/etc/passwd"


def test_hostile_paths_through_the_pipeline_make_no_request(
    ray_cluster, paths_world, tiny_checkpoint
):
    proxy, redirect = paths_world["proxy"], paths_world["redirect"]
    proxy.reset_counters()
    summary = run(_paths_job(paths_world, tiny_checkpoint, allow_http=True, out="on"))
    out = read_output(f"s3://{PATHS_BUCKET}/out/on")
    got = dict(zip(out.column("id").to_pylist(), out.column("status").to_pylist(), strict=True))
    uris = paths_world["uris"]
    assert len(uris) == 26 and out.num_rows == 26 == summary.rows_out
    assert got == {i: "ok" if i.startswith("good-") else "invalid_path" for i in uris}
    errors = dict(zip(out.column("id").to_pylist(), out.column("error").to_pylist(), strict=True))
    assert "loopback" in errors["hostile-decimal-ip"]
    assert "link-local" in errors["hostile-metadata"]
    assert "through a link" in errors["hostile-local-symlink"]
    # The storage endpoint saw the job (manifest, good image, output) but nothing hostile.
    assert proxy.count(method="GET", path=f"/{PATHS_BUCKET}/images/good.jpg") >= 1
    assert proxy.count(contains="evil") == 0
    assert proxy.count(contains="private") == 0
    assert redirect.requests() == []


def _fetch_input(rows: pa.Table, prefix: str) -> pa.Table:
    return rows.filter(pc.starts_with(rows.column("id"), prefix))


@pytest.mark.parametrize("allow_http", [False, True])
def test_hostile_paths_open_no_socket_and_no_file(
    paths_world, tiny_checkpoint, allow_http, ray_cluster
):
    job = _paths_job(paths_world, tiny_checkpoint, allow_http, out=f"inproc-{allow_http}")
    p = plan(job)
    shards = pa.Table.from_pylist(
        [{"shard_id": s.shard_id, "path": s.path, "start": s.start, "end": s.end} for s in p.shards]
    )
    rows = ReadStage.for_job(job)(shards)
    stage = FetchStage.for_job(job, default_policy(job, p.files), "fp")
    hostile = _fetch_input(rows, "hostile-")
    paths_world["proxy"].reset_counters()
    with h.SocketSpy() as spy:
        out = stage(hostile)
    assert out.num_rows == 24
    assert out.column("status").to_pylist() == ["invalid_path"] * 24
    assert all(out.column("error").to_pylist())
    assert spy.connects == []
    assert [o for o in spy.opens if _is_evil_open(o)] == []
    assert paths_world["proxy"].stats().requests == 0
    assert paths_world["redirect"].requests() == []
    if allow_http:
        # Control: the same spy does see the good rows' connection and file open.
        with h.SocketSpy() as spy:
            good = stage(_fetch_input(rows, "good-"))
        assert good.column("status").to_pylist() == ["ok", "ok"]
        port = int(paths_world["proxy"].url.rsplit(":", 1)[1])
        assert ("127.0.0.1", port) in spy.connects
        assert f"{paths_world['allowed']}/good.jpg" in spy.opens


def test_redirects_to_disallowed_addresses_are_never_followed(paths_world, tiny_checkpoint):
    """With the redirector's own address trusted (allowed_networks), it is contacted; every
    redirect it answers is checked again, and a disallowed target gets no connection."""
    png = h.one_pixel()
    with (
        h.spy_server(host="127.0.0.2") as forbidden,
        h.spy_server(body=png) as allowed_target,
    ):
        targets = {
            "/to-loopback2": f"http://127.0.0.2:{forbidden.port}/evil-target.png",
            "/to-decimal": f"http://2130706434:{forbidden.port}/evil-target.png",  # 127.0.0.2
            "/to-ipv6": f"http://[::1]:{forbidden.port}/evil-target.png",
            "/to-metadata": "http://169.254.169.254/latest/meta-data/evil",
            "/to-private": "http://10.1.2.3/evil.png",
            "/to-file": "file:///etc/passwd",
            "/to-s3": f"s3://{PATHS_BUCKET}/private/evil.jpg",
            "/ok": f"http://127.0.0.1:{allowed_target.port}/good.png",
        }
        with h.redirector(targets) as redirect:
            job = _paths_job(paths_world, tiny_checkpoint, True, out="redirects")
            policy = LocationPolicy(
                allowed=[f"s3://{PATHS_BUCKET}/images/"],
                allow_http=True,
                allowed_networks=["127.0.0.1/32"],
            )
            urls = [f"{redirect.url}{path}" for path in targets]
            rows = _rows(urls)
            with h.SocketSpy() as spy:
                out = FetchStage.for_job(job, policy, "fp")(rows)
            statuses = out.column("status").to_pylist()
            assert statuses == ["invalid_path"] * 7 + ["ok"]
            assert out.column("image_bytes").to_pylist()[-1] == png
            errors = out.column("error").to_pylist()
            assert all("refused while fetching" in e for e in errors[:7]), errors
            assert Counter(spy.connects) == {
                ("127.0.0.1", redirect.port): 8,
                ("127.0.0.1", allowed_target.port): 1,
            }
            assert forbidden.requests() == []
            assert len(redirect.requests()) == 8 and len(allowed_target.requests()) == 1
    assert [o for o in spy.opens if o == "/etc/passwd"] == []


def _rows(uris: list[str]) -> pa.Table:
    """Fetch-stage input rows for these image URIs (the read stage's output schema)."""
    return pa.Table.from_pylist(
        [
            {
                "shard": "s",
                "row": i,
                "id": f"r{i}",
                "image": u,
                "image_bytes": None,
                "questions": ["q"],
                "question_errors": [None],
                "history_queries": [],
                "history_answers": [],
                "status": "ok",
                "error": None,
            }
            for i, u in enumerate(uris)
        ],
        schema=READ_SCHEMA,
    )


def test_http_fetch_statuses_sizes_and_retries(tiny_checkpoint, tmp_path):
    """http(s) images (allowed network only) go through the checked client: ok, too_large from
    the declared or the streamed size, 4xx answered once, 5xx retried `storage.retries` times."""
    png = h.one_pixel()
    big = h.random_bytes(5000, seed=3)

    def respond(handler) -> None:
        path = handler.path
        if path == "/ok.png":
            h.reply(handler, 200, png)
        elif path == "/big-declared.png":
            h.reply(handler, 200, big)
        elif path == "/big-streamed.png":  # no Content-Length: the size shows while reading
            handler.send_response(200)
            handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(big)
            handler.close_connection = True
        elif path == "/gone.png":
            h.reply(handler, 404, b"gone")
        else:
            h.reply(handler, 503, b"busy")

    with h.LocalServer(respond) as server:
        job = parse_job(
            {
                "input": {"uri": str(tmp_path / "m.parquet")},
                "output": {"uri": str(tmp_path / "out")},
                "model": {
                    "visual": str(tiny_checkpoint.visual_dir),
                    "llm": str(tiny_checkpoint.llm_dir),
                },
                "storage": {"retries": 2, "timeout_s": 5},
                "limits": {"allow_http": True, "max_image_bytes": 4000},
            }
        )
        policy = LocationPolicy(allow_http=True, allowed_networks=["127.0.0.1/32"])
        names = ["ok.png", "big-declared.png", "big-streamed.png", "gone.png", "busy.png"]
        out = FetchStage.for_job(job, policy, "fp")(_rows([f"{server.url}/{n}" for n in names]))
        requests = Counter(path for _, path, _ in server.requests())
    assert out.column("status").to_pylist() == [
        "ok",
        "too_large",
        "too_large",
        "fetch_error",
        "fetch_error",
    ]
    assert out.column("image_bytes").to_pylist()[0] == png
    errors = out.column("error").to_pylist()
    assert errors[1] == "response is 5000 bytes > limit 4000"
    assert errors[2] == "response exceeds limit 4000 bytes"
    assert errors[3] == "HTTP 404 Not Found"
    assert errors[4] == "gave up after 3 attempts: HTTP 503 Service Unavailable"
    assert requests == {
        "/ok.png": 1,
        "/big-declared.png": 1,
        "/big-streamed.png": 1,
        "/gone.png": 1,
        "/busy.png": 3,
    }


# -- 4. pickle payload in a .bin -----------------------------------------------------------------
def _copy_with_bin(src: Path, dst: Path, marker: Path, zip_format: bool = True) -> Path:
    """A copy of a checkpoint dir whose weights are a .bin carrying the payload."""
    from safetensors.torch import load_file

    from ziya_model.loading import write_weights_manifest

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    h.payload_bin(dst / "pytorch_model.bin", marker, tensors, zip_format=zip_format)
    # The attacker also rewrites the checksum file: a matching checksum is no pass for a pickle.
    write_weights_manifest(dst)
    return dst


def test_pickle_payload_in_bin_is_refused_and_never_runs(tiny_checkpoint, tmp_path, moto_endpoint):
    import torch

    from ziya_model import load_ziya
    from ziya_model.loading import UnsafeCheckpointError

    marker = tmp_path / "payload-ran"
    vis = tiny_checkpoint.visual_dir
    llm = tiny_checkpoint.llm_dir
    bad_visual = _copy_with_bin(vis, tmp_path / "visual-zip", marker)
    bad_visual_raw = _copy_with_bin(vis, tmp_path / "visual-raw", marker, zip_format=False)
    bad_llm = _copy_with_bin(llm, tmp_path / "llm-zip", marker)

    for visual_dir in (bad_visual, bad_visual_raw):
        with pytest.raises(UnsafeCheckpointError, match="Weights only load failed"):
            load_ziya(visual_dir, llm)
        assert not marker.exists()
    # The LLM's .bin is read by transformers, also with weights_only=True. (load_ziya lets
    # its UnpicklingError through unwrapped; either way nothing runs.)
    with pytest.raises((UnsafeCheckpointError, pickle.UnpicklingError), match="Weights only"):
        load_ziya(vis, bad_llm)
    assert not marker.exists()

    # The pipeline's loader: the model on S3 is copied to the node cache, then refused.
    bucket = "hard-models"
    create_bucket(moto_endpoint, bucket)
    upload_dir(moto_endpoint, bad_visual, bucket, "visual/")
    upload_dir(moto_endpoint, llm, bucket, "llm/")
    cache = tmp_path / "cache"
    job = parse_job(
        {
            "input": {"uri": "s3://unused/m.parquet"},
            "output": {"uri": str(tmp_path / "out")},
            "model": {
                "visual": f"s3://{bucket}/visual",
                "llm": f"s3://{bucket}/llm",
                "cache_dir": str(cache),
            },
            "storage": {"endpoint_url": moto_endpoint},
        }
    )
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        ModelLoader(job)()
    assert len(list(cache.glob("visual-*/pytorch_model.bin"))) == 1  # it really got that far
    assert not marker.exists()

    # Control: the payload is real. An unsafe load runs it.
    torch.load(bad_visual / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


# -- 5. canary credentials -----------------------------------------------------------------------
CANARY_KEY_ID = "AKIACANARY0000000007"
CANARY_SECRET = "canarySecret/0123+abcdefghijKLMNOPqrstuv"
CANARY_TOKEN = "FwoGZXIvYXdzECANARYTOKENcanary0123456789/+=abcdefghijklmnopqrstuvwxyz"


def _canary_forms() -> list[bytes]:
    forms = set()
    for value in (CANARY_KEY_ID, CANARY_SECRET, CANARY_TOKEN, "CANARYTOKEN"):
        forms.update({value, quote(value, safe=""), quote_plus(value)})
    return [f.encode() for f in forms]


def _files_with_canary(root: Path) -> list[str]:
    hits = []
    forms = _canary_forms()
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if any(f in data for f in forms):
                hits.append(str(path))
    return hits


def test_canary_credentials_leak_nowhere(photo_dir, tiny_checkpoint, tmp_path):
    photos = sorted(photo_dir.glob("*.jpg"))[:2]
    images = [str(p) for p in photos] + [
        "s3://hard-canary/denied/a.jpg",
        "s3://hard-canary/denied/b.jpg",
        "s3://nobucket/images/c.jpg",
        "s3://hard-canary/missing/d.jpg",
        "s3://hard-canary/slow/e.jpg",
    ]
    ids = [f"c{i}" for i in range(len(images))]
    pq.write_table(pa.table({"id": ids, "image": images}), tmp_path / "m.parquet")
    out = tmp_path / "out"
    # Short: Ray's unix sockets live under it (path length limit).
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    try:
        with h.echoing_s3() as storage:
            job = {
                "name": "hardening-canary",
                "input": {"uri": str(tmp_path / "m.parquet")},
                "output": {"uri": str(out), "rows_per_shard": 4},
                "model": {
                    "visual": str(tiny_checkpoint.visual_dir),
                    "llm": str(tiny_checkpoint.llm_dir),
                },
                "generation": {"max_new_tokens": 2},
                "resources": {"batch_size": 4},
                "storage": {"endpoint_url": storage.url, "retries": 1, "timeout_s": 5},
                "limits": {
                    "allowed_locations": [
                        f"{photo_dir}/",
                        "s3://hard-canary/",
                        "s3://nobucket/",
                    ]
                },
            }
            (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
            env.update(
                {
                    "AWS_ACCESS_KEY_ID": CANARY_KEY_ID,
                    "AWS_SECRET_ACCESS_KEY": CANARY_SECRET,
                    "AWS_SESSION_TOKEN": CANARY_TOKEN,
                    "RAY_TMPDIR": str(ray_tmp),
                    "RAY_AUTH_MODE": "disabled",
                }
            )
            proc = subprocess.run(
                [sys.executable, "-m", "jobs.cli", "run", str(tmp_path / "job.yaml")],
                cwd=REPO,
                env=env,
                capture_output=True,
                timeout=300,
            )
            seen = storage.requests()
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
        # The canaries were really in play: the endpoint got them, and quoted them back.
        assert any(CANARY_KEY_ID in hdr.get("Authorization", "") for _, _, hdr in seen)
        assert any(hdr.get("X-Amz-Security-Token") == CANARY_TOKEN for _, _, hdr in seen)
        result = read_output(str(out))
        statuses = dict(
            zip(result.column("id").to_pylist(), result.column("status").to_pylist(), strict=True)
        )
        assert statuses == {
            "c0": "ok",
            "c1": "ok",
            "c2": "fetch_error",
            "c3": "fetch_error",
            "c4": "fetch_error",
            "c5": "fetch_error",
            "c6": "fetch_error",
        }
        errors = [e for e in result.column("error").to_pylist() if e]
        assert len(errors) == 5
        assert sum("[REDACTED]" in e for e in errors) >= 3, errors  # the echoes, masked
        logs = list(ray_tmp.rglob("session_*/logs/*"))
        assert len(logs) > 5, logs  # Ray really logged there
        assert _files_with_canary(ray_tmp) == []
        assert _files_with_canary(out) == []
        assert (out / "_summary.json").is_file() and (out / "_SUCCESS").is_file()
        for stream in (proc.stdout, proc.stderr):
            assert not any(f in stream for f in _canary_forms())
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_storage_error_on_the_manifest_is_redacted_on_stderr(
    monkeypatch, capsys, tiny_checkpoint, tmp_path
):
    """A job that stops before Ray (its manifest cannot be read) prints the storage error,
    which quotes the credentials back, with the credentials masked."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CANARY_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", CANARY_TOKEN)
    with h.echoing_s3() as storage:
        job = {
            "input": {"uri": "s3://hard-canary/denied/m.parquet"},
            "output": {"uri": str(tmp_path / "out")},
            "model": {
                "visual": str(tiny_checkpoint.visual_dir),
                "llm": str(tiny_checkpoint.llm_dir),
            },
            "storage": {"endpoint_url": storage.url, "retries": 0},
        }
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
        assert cli_main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 2
        seen = storage.requests()
    err = capsys.readouterr().err
    assert any(CANARY_KEY_ID in hdr.get("Authorization", "") for _, _, hdr in seen)
    assert "m.parquet" in err and "[REDACTED]" in err, err
    assert not any(f.decode() in err for f in _canary_forms()), err


def test_pickled_stages_and_filesystems_carry_no_credentials(
    monkeypatch, moto_endpoint, tiny_checkpoint, tmp_path
):
    """What Ray ships to workers (the stages, with their filesystem caches) holds no key: the
    filesystems take credentials from the default chain on whichever node runs them."""
    from ray import cloudpickle

    for name, value in (
        ("AWS_ACCESS_KEY_ID", CANARY_KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", CANARY_SECRET),
        ("AWS_SESSION_TOKEN", CANARY_TOKEN),
    ):
        monkeypatch.setenv(name, value)
    create_bucket(moto_endpoint, "hard-pickle")
    put_bytes(moto_endpoint, "hard-pickle", "images/a.png", h.one_pixel())
    job = parse_job(
        {
            "input": {"uri": "s3://hard-pickle/m.parquet"},
            "output": {"uri": str(tmp_path / "out")},
            "model": {
                "visual": str(tiny_checkpoint.visual_dir),
                "llm": str(tiny_checkpoint.llm_dir),
            },
            "storage": {"endpoint_url": moto_endpoint},
        }
    )
    stage = FetchStage.for_job(job, LocationPolicy(allowed=["s3://hard-pickle/images/"]), "fp")
    out = stage(_rows(["s3://hard-pickle/images/a.png"]))
    assert out.column("status").to_pylist() == ["ok"]  # credentials were resolved and used
    fs, _ = filesystem("s3://hard-pickle/images/a.png", job.storage)
    assert fs.exists("hard-pickle/images/a.png")
    for obj in (stage, fs, ModelLoader(job)):
        blob = cloudpickle.dumps(obj)
        assert not any(f in blob for f in _canary_forms()), type(obj).__name__


# -- 6. hostile questions and strings ------------------------------------------------------------
HOSTILE_QUESTIONS: list[tuple[str | bytes | None, str | None]] = [
    # (question as written to the manifest, cleaned question if the row is ok else None)
    ("", None),
    ("   \t\n  ", None),
    ("x" * 100_000, None),
    ("\u200b\u200c\u200d\ufeff", None),
    (None, None),
    ("\x00\x01\x07 what is this?\x1b", "what is this?"),
    (b"caf\xe9 ?", "caf\ufffd ?"),  # Latin-1, not UTF-8
    ("\ud800 lone surrogate?", "\ufffd\ufffd\ufffd lone surrogate?"),  # its 3 bytes, each bad
    ("ما هذا؟", "ما هذا؟"),
    ("שלום, מה זה?", "שלום, מה זה?"),
    ("what is 🐱🚀 doing?", "what is 🐱🚀 doing?"),
    ("line one\r\nline two?", "line one\nline two?"),
    ("\u202eright-to-left override?", "\u202eright-to-left override?"),
]


def test_hostile_questions_and_strings_write_cleanly(
    ray_cluster, photo_dir, tiny_checkpoint, tmp_path
):
    n = len(HOSTILE_QUESTIONS)
    ids = [f"q{i:02d}" for i in range(n)]
    ids[1] = b"q01-\xff"  # an id that is not UTF-8 either
    manifest = pa.table(
        {
            "id": h.raw_strings(ids),
            "image": [str(photo_dir / "cat.jpg")] * n,
            "question": h.raw_strings(q for q, _ in HOSTILE_QUESTIONS),
            "source": h.raw_strings([b"src-\xc3\x28", "\udfff", *["plain"] * (n - 2)]),
            "tags": h.raw_string_lists([[b"\xff", "ok"], None, *[["t"]] * (n - 2)]),
        }
    )
    pq.write_table(manifest, tmp_path / "m.parquet")
    job = parse_job(
        {
            "name": "hardening-questions",
            "input": {"uri": str(tmp_path / "m.parquet")},
            "output": {"uri": str(tmp_path / "out"), "rows_per_shard": 5},
            "task": {"kind": "vqa"},
            "model": {
                "visual": str(tiny_checkpoint.visual_dir),
                "llm": str(tiny_checkpoint.llm_dir),
            },
            "generation": {"max_new_tokens": 3},
            "resources": {"batch_size": 8},
            "limits": {"allowed_locations": [f"{photo_dir}/"]},
        }
    )
    # The model's answers get a lone surrogate appended: the writer must survive those too.
    summary = run(job, loader=h.SurrogateAnswers(job))
    assert summary.rows_in == summary.rows_out == n
    assert (tmp_path / "out" / "_SUCCESS").is_file()
    for f in sorted((tmp_path / "out" / "shards").glob("*.parquet")):
        pq.read_table(f).validate(full=True)  # every string in the output is valid UTF-8
    out = read_output(str(tmp_path / "out")).to_pylist()
    assert len(out) == n and len({r["id"] for r in out}) == n
    by_row = {r["manifest_row"]: r for r in out}
    expected = {
        i: ("ok" if q is not None else "invalid_question")
        for i, (_, q) in enumerate(HOSTILE_QUESTIONS)
    }
    assert {i: r["status"] for i, r in by_row.items()} == expected
    assert Counter(expected.values()) == {"ok": 8, "invalid_question": 5}
    for i, (_, cleaned) in enumerate(HOSTILE_QUESTIONS):
        r = by_row[i]
        if cleaned is None:
            assert r["answer"] is None and r["error"], r
        else:
            assert r["question"] == cleaned
            assert r["answer"].endswith("\ufffd") and 1 <= r["num_tokens"] <= 3
    assert "too long (100000 chars > 2000)" in by_row[2]["error"]
    assert by_row[1]["id"] == "q01-\ufffd"
    assert by_row[0]["source"] == "src-\ufffd(" and by_row[1]["source"] == "\ufffd\ufffd\ufffd"
    assert by_row[0]["tags"] == ["\ufffd", "ok"] and by_row[1]["tags"] is None
