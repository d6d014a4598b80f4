"""Image decoding and preprocessing for Ziya-Visual (CLIP mean/std at `vision_config.image_size`).

`decode_image` turns untrusted bytes into an RGB PIL image or raises `ImageTooLarge` /
`ImageDecodeError` with a message saying why:
- the size is read from the header and checked before any pixel is decoded (decompression
  bombs, including tiny highly compressible PNGs, never allocate their full size; Pillow's own
  `DecompressionBombWarning` only warns below 2x its limit, so it is turned into an error too);
- truncated files fail (`ImageFile.LOAD_TRUNCATED_IMAGES` must stay off, the default);
- alpha (RGBA, LA, P + transparency) is composited on white, as transformers' `convert_to_rgb`
  (the reference preprocessing) does; CMYK, grayscale, 1-bit and 16-bit (I;16, scaled >> 8)
  become RGB; EXIF orientation is applied; animated images give their first frame;
- with `draft_size`, JPEGs are decoded at the smallest DCT scale that still covers
  `draft_size` x `draft_size` (up to 8x less decoding work) -- the fast path, where
  `decode_pixels` decodes most JPEGs through simplejpeg into a numpy array instead.

`ZiyaImageProcessor` has two modes: `__call__` reproduces transformers' `BlipImageProcessor`
(PIL backend, size given explicitly) exactly; `preprocess_uint8` + `normalize` is the fast path
that ships uint8 [3, S, S] (a quarter of float32) and normalizes on the model's device.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_MAX_PIXELS = 40_000_000  # ~ a 7300x5500 photo; anything bigger is refused
# Formats Pillow may sniff; exotic decoders (EPS, PSD, ...) are attack surface we do not need.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")  # JPEG also opens MPO
_WHITE = (255, 255, 255)


class ImageTooLarge(ValueError):
    """The image's declared size exceeds the pixel budget (checked before decoding)."""


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (empty, unknown format, truncated, corrupt)."""


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty image (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLarge(f"image too large: {err}") from err
    except UnidentifiedImageError as err:
        raise ImageDecodeError(
            f"not an image in a supported format ({', '.join(ALLOWED_FORMATS)}); "
            f"{len(data)} bytes starting {data[:8]!r}"
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"corrupt image header: {err}") from err
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image too large: {width}x{height} = {width * height} pixels > limit {max_pixels}"
        )
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB conversion for every mode we accept; alpha is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit samples: a plain convert("L") clips at 255 (almost all white), so scale instead.
        arr = np.asarray(img, dtype=np.uint32 if mode != "I" else np.int64)
        if mode == "I" and arr.max(initial=0) <= 255:
            arr8 = arr.clip(0, 255).astype(np.uint8)
        else:
            arr8 = (arr.clip(0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray((arr * scale).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, draft_size: int | None = None
) -> Image.Image:
    """Decode untrusted image bytes to an RGB PIL image (EXIF-rotated, first frame).

    Raises `ImageTooLarge` when the header declares more than `max_pixels` pixels (nothing is
    decoded then) and `ImageDecodeError` for anything that is not a complete image. With
    `draft_size`, JPEGs decode at a reduced DCT scale covering `draft_size` on both sides.
    """
    return _decode_opened(_open_checked(data, max_pixels), draft_size)


def _decode_opened(img: Image.Image, draft_size: int | None) -> Image.Image:
    """`decode_image` after the header checks."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Global Pillow switch; if someone turned it on, truncated files would pass silently.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False")
    try:
        # Animated images: open() leaves the first frame current and load() decodes only that
        # one (asking n_frames would scan every frame of a possibly hostile file).
        if draft_size and img.format in ("JPEG", "MPO"):
            # DCT scaling by 1/2, 1/4 or 1/8, keeping both sides >= the request.
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when upright
        return _to_rgb(img)
    except (Image.DecompressionBombError, MemoryError) as err:
        raise ImageTooLarge(f"image too large to decode: {err}") from err
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError) as err:
        raise ImageDecodeError(f"cannot decode {img.format} image: {err}") from err


_EXIF_ORIENTATION = 0x0112


def decode_pixels(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, min_size: int
) -> np.ndarray:
    """The fast path's decode: untrusted bytes -> RGB uint8 [H, W, 3], reduced in size where the
    format allows but covering `min_size` on both sides.

    Upright YCbCr or grey JPEGs (nearly all photographs) are decoded by libjpeg-turbo through
    simplejpeg at the smallest DCT scale that keeps both sides >= `min_size`, straight into a
    numpy array: Pillow's decoder runs the same library but goes through its own 4-byte pixel
    store, which costs ~15% more per image. Every other image (CMYK, EXIF-rotated, PNG, ...)
    goes through `decode_image(..., draft_size=min_size)`. The header checks and the errors are
    the same either way; a truncated or corrupt JPEG raises `ImageDecodeError`.
    """
    img = _open_checked(data, max_pixels)
    try:
        upright = img.getexif().get(_EXIF_ORIENTATION, 1) == 1
    except Exception:  # malformed EXIF: let Pillow's path below decide (row status, no crash)
        upright = False
    if img.format == "JPEG" and img.mode in ("RGB", "L") and upright:
        import simplejpeg

        # Power-of-two scales only, as Pillow's draft: libjpeg-turbo's other n/8 scales (3/4,
        # 5/8, ...) are rougher, and would take a 451x300 photo 0.03 away from the reference.
        width, height = img.size
        factor = 8
        while factor > 1 and min(width, height) < min_size * factor:
            factor //= 2
        try:
            return simplejpeg.decode_jpeg(
                data,
                colorspace="RGB",
                min_height=-(-height // factor),
                min_width=-(-width // factor),
                strict=True,
            )
        except ValueError as err:
            raise ImageDecodeError(f"cannot decode JPEG image: {err}") from err
    return np.array(_decode_opened(img, draft_size=min_size))  # writable, for torch


class ZiyaImageProcessor:
    """Resize to `image_size` x `image_size` (bicubic, no crop), rescale 1/255, CLIP-normalize."""

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
    ):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean32 = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        self._std32 = np.asarray(self.std, dtype=np.float32)[:, None, None]

    def __repr__(self) -> str:
        return f"ZiyaImageProcessor(image_size={self.image_size}, mean={self.mean}, std={self.std})"

    def _resize(self, img: Image.Image) -> Image.Image:
        img = _to_rgb(img)
        size = (self.image_size, self.image_size)
        return img if img.size == size else img.resize(size, Image.Resampling.BICUBIC)

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """Exact reference mode: float32 [B, 3, S, S], the same arithmetic as transformers'
        `BlipImageProcessor(size={"height": S, "width": S})` with its PIL backend."""
        if isinstance(images, Image.Image):
            images = [images]
        out = np.empty((len(images), 3, self.image_size, self.image_size), dtype=np.float32)
        for i, img in enumerate(images):
            chw = np.asarray(self._resize(img)).transpose(2, 0, 1)
            # As transformers: rescale in float64, cast to float32, then normalize in float32.
            scaled = (chw.astype(np.float64) * (1 / 255)).astype(np.float32)
            out[i] = (scaled - self._mean32) / self._std32
        return torch.from_numpy(out)

    def preprocess_uint8(self, img: Image.Image | np.ndarray) -> np.ndarray:
        """Fast path: resized pixels as uint8 [3, S, S], from an image or an RGB uint8 [H, W, 3]
        array (decode with `decode_pixels`, or `decode_image` with `draft_size`, first).

        The resize is torch's uint8 bicubic antialiased kernel on a channels-last view: the
        same filter as Pillow's bicubic (agreement within a grey level) at about twice its
        speed, and no float image is ever materialized on the CPU.
        """
        if isinstance(img, Image.Image):
            # A writable copy: torch refuses to wrap Pillow's read-only buffer.
            hwc = np.array(_to_rgb(img))
        else:
            hwc = img if img.flags.writeable else img.copy()
        if hwc.dtype != np.uint8 or hwc.ndim != 3 or hwc.shape[2] != 3:
            raise ValueError(f"expected RGB uint8 [H, W, 3] pixels, got {hwc.dtype} {hwc.shape}")
        size = self.image_size
        if hwc.shape[:2] == (size, size):
            return np.ascontiguousarray(hwc.transpose(2, 0, 1))
        nchw = torch.from_numpy(hwc).permute(2, 0, 1).unsqueeze(0)  # channels-last view
        resized = F.interpolate(
            nchw, size=(size, size), mode="bicubic", antialias=True, align_corners=False
        )
        return resized[0].contiguous().numpy()

    def normalize(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 [B, 3, S, S] or [3, S, S] on any device -> normalized `dtype` [B, 3, S, S].

        The arithmetic runs in float32 on the tensor's device, then casts to `dtype`.
        """
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected [B, 3, S, S] pixels, got {tuple(pixels.shape)}")
        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        scaled = pixels.to(torch.float32) * (1 / 255)
        return ((scaled - mean) / std).to(dtype)
