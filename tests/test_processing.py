"""Image decoding (hostile and odd inputs) and preprocessing agreement with BlipImageProcessor."""

import functools
import io
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from transformers import BlipImageProcessor

from ziya_model import (
    ImageDecodeError,
    ImageTooLarge,
    ZiyaImageProcessor,
    decode_image,
    decode_pixels,
)

ROOT = Path(__file__).resolve().parents[1]
S = 224
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


@functools.cache
def png_bomb(side: int) -> bytes:
    """A valid single-colour 8-bit grayscale PNG of side x side pixels, built without ever
    holding its pixels (a 20000 x 20000 one is ~390 KB on disk, 400 MB decoded)."""
    compressor = zlib.compressobj(9)
    rows = (b"\x00" + b"\x00" * side) * 100  # filter byte + pixels, 100 rows at a time
    idat = b"".join(compressor.compress(rows) for _ in range(side // 100)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def photo_jpegs(tmp_path_factory) -> dict[str, Path]:
    """Real photographs from scikit-image, saved as JPEG files (quality 90)."""
    folder = tmp_path_factory.mktemp("photos")
    paths = {}
    for name in PHOTOS:
        arr = getattr(data, name)()
        paths[name] = folder / f"{name}.jpg"
        Image.fromarray(arr).convert("RGB").save(paths[name], quality=90)
    return paths


@pytest.fixture(scope="module")
def reference():
    return BlipImageProcessor(size={"height": S, "width": S})


def test_exact_mode_matches_blip_image_processor(photo_jpegs, reference):
    processor = ZiyaImageProcessor(S)
    for name, path in photo_jpegs.items():
        with Image.open(path) as img:
            img.load()
            ours = processor(img)
            theirs = reference(img, return_tensors="pt")["pixel_values"]
        assert ours.shape == theirs.shape == (1, 3, S, S), name
        assert ours.dtype == torch.float32
        assert float((ours - theirs).abs().max()) <= 1e-6, name


@pytest.mark.parametrize(
    "decode",
    [
        pytest.param(lambda raw: decode_pixels(raw, min_size=S), id="decode_pixels"),
        pytest.param(lambda raw: decode_image(raw, draft_size=S), id="pillow_draft"),
    ],
)
def test_fast_path_agrees_with_reference(photo_jpegs, reference, decode):
    processor = ZiyaImageProcessor(S)
    diffs = []
    for name, path in photo_jpegs.items():
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            theirs = reference(img, return_tensors="pt")["pixel_values"]
        pixels = processor.preprocess_uint8(decode(raw))
        assert pixels.dtype == np.uint8 and pixels.shape == (3, S, S), name
        ours = processor.normalize(torch.from_numpy(pixels), torch.float32)
        diffs.append(float((ours - theirs).abs().mean()))
    figures = {name: round(d, 4) for name, d in zip(photo_jpegs, diffs, strict=True)}
    print(f"fast path mean abs diff (normalized units): {figures}")
    assert max(diffs) <= 0.03, diffs
    assert min(diffs) > 0  # draft() really changed the decode (the comparison is not vacuous)


def test_fast_resize_matches_exact_mode_without_draft(photo_jpegs):
    processor = ZiyaImageProcessor(S)
    img = decode_image(photo_jpegs["coffee"].read_bytes())
    uint8 = torch.from_numpy(processor.preprocess_uint8(img))
    exact = processor(img)
    diff = (processor.normalize(uint8) - exact).abs()
    grey_level = 1 / 255 / min(processor.std)  # one uint8 step in normalized units
    assert float(diff.max()) <= 2 * grey_level + 1e-6  # torch's uint8 bicubic vs Pillow's
    assert float(diff.mean()) <= 0.1 * grey_level
    half = processor.normalize(uint8.unsqueeze(0), torch.float16)
    assert half.dtype == torch.float16 and half.shape == (1, 3, S, S)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (32, 24), (0, 255, 255, 0))  # pure red in CMYK
    img = decode_image(_encode(cmyk, "JPEG", quality=95))
    assert img.mode == "RGB" and img.size == (32, 24)
    r, g, b = img.getpixel((16, 12))
    assert r > 200 and g < 60 and b < 60


def test_palette_with_transparency_is_composited_on_white():
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (0, 0, 4, 8))  # left half red, right half palette 0 = transparent black
    img = decode_image(_encode(pal, "PNG", transparency=0))
    assert img.mode == "RGB"
    assert img.getpixel((1, 1)) == (255, 0, 0)
    assert img.getpixel((6, 6)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(mode):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((0, 0), (0, 0, 0, 255))  # one opaque black pixel
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black
    img = decode_image(_encode(rgba.convert(mode), "PNG"))
    assert img.getpixel((0, 0)) == (0, 0, 0)
    assert img.getpixel((3, 3)) == (255, 255, 255)
    assert all(120 <= c <= 135 for c in img.getpixel((1, 0)))


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    arr = np.array([[0, 256 * 64, 256 * 128, 65535]], dtype=np.uint16)
    src = Image.fromarray(arr)
    assert src.mode.startswith("I;16")
    img = decode_image(_encode(src, "PNG"))
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0))[0] for x in range(4)] == [0, 64, 128, 255]


def test_grayscale_and_bilevel_become_rgb():
    for mode, colour in (("L", 77), ("1", 1)):
        img = decode_image(_encode(Image.new(mode, (5, 3), colour), "PNG"))
        assert img.mode == "RGB" and img.size == (5, 3)


def test_exif_orientation_is_applied():
    src = Image.new("RGB", (40, 20), (255, 0, 0))
    src.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img = decode_image(_encode(src, "JPEG", quality=95, exif=exif.tobytes()))
    assert img.size == (20, 40)
    top, bottom = img.getpixel((10, 5)), img.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    raw = io.BytesIO()
    frames[0].save(raw, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    img = decode_image(raw.getvalue())
    assert img.mode == "RGB" and img.getpixel((8, 8)) == (255, 0, 0)


@pytest.mark.parametrize("size", [(1, 1), (10000, 2), (2, 10000)])
def test_tiny_and_extreme_aspect_images_preprocess(size):
    img = decode_image(_encode(Image.new("RGB", size, (10, 200, 30)), "PNG"))
    pixels = ZiyaImageProcessor(S).preprocess_uint8(img)
    assert pixels.shape == (3, S, S)
    assert tuple(pixels[:, S // 2, S // 2]) == (10, 200, 30)


def test_truncated_jpeg_is_a_decode_error(photo_jpegs):
    raw = photo_jpegs["astronaut"].read_bytes()
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(raw[: len(raw) // 2])
    with pytest.raises(ImageDecodeError, match="cannot decode JPEG"):
        decode_pixels(raw[: len(raw) // 2], min_size=S)


def test_decode_pixels_scales_down_but_covers_the_model_size(photo_jpegs):
    raw = photo_jpegs["astronaut"].read_bytes()  # 512 x 512
    pixels = decode_pixels(raw, min_size=S)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert S <= pixels.shape[0] < 512 and S <= pixels.shape[1] < 512
    full = np.asarray(decode_image(raw))
    small = np.asarray(Image.fromarray(full).resize(pixels.shape[1::-1], Image.BICUBIC))
    assert np.abs(small.astype(int) - pixels).mean() < 4  # the same picture, in grey levels
    grey = decode_pixels(_encode(Image.new("L", (1000, 900), 77), "JPEG"), min_size=S)
    assert grey.shape == (225, 250, 3) and (grey == 77).all()  # 1/4 scale, grey as RGB


def test_decode_pixels_takes_pillow_for_rotated_cmyk_and_png():
    src = Image.new("RGB", (400, 260), (255, 0, 0))
    src.paste((0, 0, 255), (200, 0, 400, 260))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated = decode_pixels(_encode(src, "JPEG", quality=95, exif=exif.tobytes()), min_size=S)
    assert rotated.shape[0] > rotated.shape[1]  # portrait now
    assert rotated[10, 100, 0] > 200 and rotated[-10, 100, 2] > 200  # red on top, blue below
    cmyk = decode_pixels(_encode(src.convert("CMYK"), "JPEG", quality=95), min_size=S)
    png = decode_pixels(_encode(src, "PNG"), min_size=S)
    for pixels in (cmyk, png):
        assert pixels.shape[2] == 3 and pixels[130, 50, 0] > 200 and pixels[130, 350, 2] > 200
    with pytest.raises(ImageTooLarge):
        decode_pixels(_encode(src, "JPEG"), max_pixels=1000, min_size=S)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "empty"),
        (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not an image"),
        (b"GIF89a" + b"\x00" * 3, "not an image|cannot decode|corrupt"),
    ],
)
def test_junk_bytes_are_decode_errors(raw, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(raw)


def test_unsupported_formats_are_refused():
    raw = _encode(Image.new("RGB", (8, 8)), "PPM")
    with pytest.raises(ImageDecodeError, match="supported format"):
        decode_image(raw)


def test_png_bomb_is_refused_from_the_header_quickly():
    bomb = png_bomb(20000)
    assert len(bomb) < 1_000_000
    start = time.perf_counter()
    with pytest.raises(ImageTooLarge, match="too large"):
        decode_image(bomb, max_pixels=40_000_000)
    assert time.perf_counter() - start < 0.5


def test_pillow_warning_range_is_refused_even_with_a_high_budget(monkeypatch):
    # 10000 x 10000 = 100 M pixels: above Pillow's 89 M warning limit, below its 179 M error
    # limit. A generous max_pixels must not let Pillow's mere warning through.
    with pytest.raises(ImageTooLarge):
        decode_image(png_bomb(10000), max_pixels=500_000_000)
    # With Pillow's own guard switched off, our header check still refuses.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageTooLarge, match="> limit"):
        decode_image(png_bomb(10000), max_pixels=50_000_000)


def test_bomb_memory_stays_bounded(tmp_path):
    """Decode a 400 M-pixel PNG bomb in a fresh process and compare its peak RSS."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(20000))
    script = (
        # Load processing.py alone (not the package, which pulls in transformers) to stay fast.
        "import importlib.util, resource, sys; from PIL import Image\n"
        f"spec = importlib.util.spec_from_file_location('p', {str(ROOT / 'ziya_model' / 'processing.py')!r})\n"
        "p = importlib.util.module_from_spec(spec); spec.loader.exec_module(p)\n"
        "decode_image, ImageTooLarge = p.decode_image, p.ImageTooLarge\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "Image.MAX_IMAGE_PIXELS = None\n"
        f"raw = open({str(bomb)!r}, 'rb').read()\n"
        "try:\n    decode_image(raw, max_pixels=40_000_000)\nexcept ImageTooLarge:\n    pass\n"
        "else:\n    sys.exit('not refused')\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    growth_kib = int(out.stdout.strip().splitlines()[-1])
    assert growth_kib < 20 * 1024, f"peak RSS grew {growth_kib} KiB"  # decoded: 400 MB


def test_processor_validates_normalize_input():
    with pytest.raises(ValueError, match=r"\[B, 3, S, S\]"):
        ZiyaImageProcessor(S).normalize(torch.zeros(2, 4, S, S, dtype=torch.uint8))
