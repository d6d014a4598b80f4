"""Hostile inputs for the hardening tests (tests/test_hardening.py), and spies that watch them.

Images: every odd or broken kind a scraped dataset holds, built in memory with Pillow (and a
decompression bomb built without ever holding its pixels). Text: Arrow string arrays carrying
bytes that are not UTF-8. Servers on 127.0.0.1: a redirector, a request-logging spy, and an
S3 look-alike that answers errors echoing the caller's credentials (as a hostile or buggy
endpoint may). Spies: an audit hook that records socket connects and file opens in this
process. Model files: a `.bin` whose pickle runs a command when unpickled.

    bomb = png_bomb(30000, 30000)        # 2.6 MB of PNG declaring 2.7 GB of RGB pixels
    with SocketSpy() as spy:
        ...
    assert spy.connects == []
"""

from __future__ import annotations

import io
import os
import random
import struct
import sys
import threading
import zlib
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image

EXIF_ORIENTATION = 0x0112


# -- images -----------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def pattern(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image with no symmetry (gradients plus a corner block), so a rotation shows."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack(
        [(255 * x / max(width - 1, 1)), (255 * y / max(height - 1, 1)), (x * y + seed) % 256],
        axis=-1,
    ).astype(np.uint8)
    arr[: height // 3, : width // 4] = (250, 20, 20)
    return Image.fromarray(arr, "RGB")


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def png_named_jpg(photo: Image.Image) -> bytes:
    """PNG bytes (the manifest calls the object .jpg: formats are sniffed, not guessed)."""
    return encode(photo, "PNG")


def cmyk_jpeg(photo: Image.Image) -> bytes:
    return encode(photo.convert("CMYK"), "JPEG", quality=90)


def palette_png_with_transparency(photo: Image.Image) -> bytes:
    pal = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return encode(pal, "PNG", transparency=0)


def png_16bit(width: int = 64, height: int = 48) -> bytes:
    ramp = np.linspace(0, 65535, width * height, dtype=np.uint32).reshape(height, width)
    img = Image.fromarray(ramp.astype(np.uint16))
    assert img.mode.startswith("I;16"), img.mode
    return encode(img, "PNG")


def rgba_png(photo: Image.Image) -> bytes:
    rgba = photo.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, rgba.width, dtype=np.uint8), (rgba.height, 1))
    rgba.putalpha(Image.fromarray(alpha, "L"))
    return encode(rgba, "PNG")


def exif_rotated_jpeg(img: Image.Image, orientation: int = 6) -> bytes:
    """JPEG of `img`'s pixels as stored, with an EXIF tag telling viewers to rotate them."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def upright_png(jpeg_with_exif: bytes) -> bytes:
    """The image a viewer shows for an orientation-6 JPEG, as a lossless PNG.

    The stored pixels are decoded without applying EXIF, then turned by hand: orientation 6
    means "rotate 90 degrees clockwise to display", which is Pillow's ROTATE_270.
    """
    stored = Image.open(io.BytesIO(jpeg_with_exif))
    assert stored.getexif().get(EXIF_ORIENTATION) == 6
    return encode(stored.convert("RGB").transpose(Image.Transpose.ROTATE_270), "PNG")


def stored_png(jpeg_with_exif: bytes) -> bytes:
    """The stored pixels of a JPEG as a PNG, EXIF ignored (what a rotation bug would show)."""
    return encode(Image.open(io.BytesIO(jpeg_with_exif)).convert("RGB"), "PNG")


def animated_gif(size: int = 40) -> tuple[bytes, tuple[int, int, int]]:
    """A 3-frame GIF (red, green, blue) and the colour of its first frame."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (size, size), c) for c in colours]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    return data, colours[0]


def one_pixel() -> bytes:
    return encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")


def extreme_aspect(width: int = 10000, height: int = 3) -> bytes:
    return encode(pattern(width, height), "PNG")


def _zeros_zlib(total: int, chunk: int = 1 << 20) -> bytes:
    """A zlib stream of `total` zero bytes, built without compressing them all.

    After a full flush deflate starts over, so one compressed chunk of zeros can be repeated;
    the Adler-32 of n zeros is (n mod 65521) << 16 | 1.
    """
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH)
    tail_c = zlib.compressobj(9, zlib.DEFLATED, -15)
    rest = total % chunk
    tail = (tail_c.compress(bytes(rest)) if rest else b"") + tail_c.flush(zlib.Z_FINISH)
    adler = ((total % 65521) << 16) | 1
    return b"\x78\xda" + block * (total // chunk) + tail + struct.pack(">I", adler)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid, single-colour (black) 8-bit RGB PNG of width x height: a decompression bomb.

    30000 x 30000 is 2.6 MB on disk and 2.7 GB of pixels once decoded.
    """
    raw = height * (1 + 3 * width)  # each row: filter byte + RGB samples, all zero
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", _zeros_zlib(raw))
        + _png_chunk(b"IEND", b"")
    )


# -- text -------------------------------------------------------------------------------------
def raw_strings(values: Iterable[str | bytes | None]) -> pa.Array:
    """An Arrow string array holding exactly these bytes (str is UTF-8 encoded, with lone
    surrogates kept as their 3-byte forms): how a non-Python writer leaves invalid UTF-8."""
    data = [v.encode("utf-8", "surrogatepass") if isinstance(v, str) else v for v in values]
    return pa.array(data, pa.binary()).cast(pa.string(), safe=False)


def raw_string_lists(values: Iterable[list[str | bytes] | None]) -> pa.Array:
    values = list(values)
    flat = [v for row in values if row is not None for v in row]
    offsets = [0]
    for row in values:
        offsets.append(offsets[-1] + (len(row) if row is not None else 0))
    mask = pa.array([row is None for row in values])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), raw_strings(flat), mask=mask)


# -- servers on 127.0.0.1 ---------------------------------------------------------------------
class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass


class LocalServer:
    """A threaded HTTP server on `host` (a free port) whose handler is `respond(handler)`.

    Every request is logged as (method, path, headers) before it is answered.
    """

    def __init__(self, respond: Callable[[BaseHTTPRequestHandler], None], host: str = "127.0.0.1"):
        owner = self

        class Handler(_Quiet):
            def _any(self) -> None:
                with owner.lock:
                    owner.log.append((self.command, self.path, dict(self.headers)))
                respond(self)

            do_GET = do_HEAD = do_PUT = do_POST = _any

        self.lock = threading.Lock()
        self.log: list[tuple[str, str, dict[str, str]]] = []
        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.host, self.port = self.server.server_address[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        with self.lock:
            return list(self.log)


def reply(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    length: int | None = None,
    **headers: str,
) -> None:
    """Answer with `body` (`length` overrides Content-Length, for HEAD); header names use _."""
    handler.send_response(status)
    for k, v in headers.items():
        handler.send_header(k.replace("_", "-"), v)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


def redirector(targets: dict[str, str], host: str = "127.0.0.1") -> LocalServer:
    """A server answering `302 Location: targets[path]` (404 for other paths)."""

    def respond(h: BaseHTTPRequestHandler) -> None:
        if h.path in targets:
            reply(h, 302, Location=targets[h.path])
        else:
            reply(h, 404, b"no")

    return LocalServer(respond, host)


def spy_server(body: bytes = b"", host: str = "127.0.0.1") -> LocalServer:
    """A server that answers 200 with `body` to everything (and logs it)."""
    return LocalServer(lambda h: reply(h, 200, body, Content_Type="image/png"), host)


def _s3_error(code: str, message: str, resource: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>4442587FB7D0A2F9</RequestId></Error>"
    ).encode()


def echoing_s3() -> LocalServer:
    """An S3 look-alike that fails every read and quotes the caller's credentials back.

    Paths (path-style, /bucket/key): `/<b>/denied/...` -> 403 AccessDenied on GET (HEAD says
    the object exists, so clients go on to read it and see the body); `/nobucket/...` -> 404
    NoSuchBucket; `/<b>/slow/...` -> 503 SlowDown; anything else -> 404 NoSuchKey. Messages
    carry the Authorization header (access key id) and X-Amz-Security-Token (session token),
    as a buggy proxy or a hostile endpoint might: only redaction keeps them out of outputs.
    """

    def respond(h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        echo = (
            (
                f"denied for {h.headers.get('Authorization', '')} "
                f"token={h.headers.get('X-Amz-Security-Token', '')}"
            )
            .replace("&", "&amp;")
            .replace("<", "&lt;")
        )
        xml = {"Content_Type": "application/xml"}
        if path.startswith("/nobucket/"):
            reply(h, 404, _s3_error("NoSuchBucket", echo, path), **xml)
        elif "/slow/" in path:
            reply(h, 503, _s3_error("SlowDown", echo, path), **xml)
        elif "/denied/" in path and h.command == "HEAD":
            reply(h, 200, length=1000, Content_Type="image/jpeg", ETag='"e1"')
        elif "/denied/" in path:
            reply(h, 403, _s3_error("AccessDenied", echo, path), **xml)
        else:
            reply(h, 404, _s3_error("NoSuchKey", echo, path), **xml)

    return LocalServer(respond)


# -- spies ------------------------------------------------------------------------------------
class SocketSpy:
    """Records socket connects and file opens made by this process while active.

    Built on `sys.addaudithook`: the hook sees every connect (blocking or not, from any
    library: http.client, botocore, aiohttp) and every `open`. Audit hooks cannot be removed,
    so one hook is installed once and records only while a spy is active.
    """

    _active: ClassVar[list[SocketSpy]] = []
    _installed: ClassVar[bool] = False

    def __init__(self) -> None:
        self.connects: list[Any] = []
        self.opens: list[str] = []

    @classmethod
    def _hook(cls, event: str, args: tuple) -> None:
        if not cls._active:
            return
        if event == "socket.connect":
            for spy in cls._active:
                spy.connects.append(args[1])
        elif event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            for spy in cls._active:
                spy.opens.append(os.fsdecode(args[0]))

    def __enter__(self) -> SocketSpy:
        if not SocketSpy._installed:
            sys.addaudithook(SocketSpy._hook)
            SocketSpy._installed = True
        SocketSpy._active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        SocketSpy._active.remove(self)


# -- model files ------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs `touch <marker>`: the side effect a malicious .bin would have."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def payload_bin(path: Path, marker: Path, tensors: dict | None = None, zip_format: bool = True):
    """Write a `.bin` state dict with the payload inside (torch's zip format or raw pickle)."""
    import pickle

    import torch

    state = dict(tensors or {})
    state["__evil__"] = _Payload(marker)
    if zip_format:
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))
    assert not marker.exists()
    return path


# -- model wrappers (picklable, for `pipeline.builder.run(job, loader=...)`) -------------------
class SurrogateAnswers:
    """Loads the real model, then makes every answer end with a lone surrogate (U+D800), as a
    misbehaving decoder might: the pipeline must still write its output."""

    def __init__(self, job: Any):
        self.job = job

    def __call__(self):
        from pipeline.runtime.weights import ModelLoader

        model, tokenizer, processor = ModelLoader(self.job)()
        real = model.answer_batch

        def answer_batch(*args: Any, **kwargs: Any):
            answers = real(*args, **kwargs)
            return [type(a)(text=a.text + "\ud800", num_tokens=a.num_tokens) for a in answers]

        model.answer_batch = answer_batch
        return model, tokenizer, processor
