"""Stage 3, preprocess: image bytes -> compact pixel arrays, on CPU tasks.

Input columns:  image_bytes, status (+ everything else, passed through)
Output columns: the input without image and image_bytes, plus pixels (binary: the image as
                uint8 [3, S, S] in fast mode, or CLIP-normalized float32 [3, S, S] in exact mode)

Fast mode decodes JPEGs at reduced scale (libjpeg-turbo DCT scaling), resizes on the CPU and
ships uint8 (a quarter of float32); the model actor normalizes on its device. Exact mode reproduces
transformers' BlipImageProcessor. The header is checked before decoding, so decompression
bombs end as `too_large` without allocating their pixels.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.columns import DECODE_ERROR, OK, TOO_LARGE, check_columns, set_column

INPUT_COLUMNS = {
    "image_bytes": "encoded image (null for failed rows)",
    "status": "row status",
    "error": "row error",
}


class PreprocessStage:
    # ziya_model.processing (and with it torch: seconds of CPU to import) is imported where the
    # stage runs, on the CPU workers: the feeder lanes build this stage but never call it.

    def __init__(self, image_size: int, max_pixels: int, mode: str = "fast"):
        self.image_size = image_size
        self.max_pixels = max_pixels
        self.mode = mode
        self._processor = None

    @property
    def processor(self):
        if self._processor is None:
            from ziya_model.processing import ZiyaImageProcessor

            self._processor = ZiyaImageProcessor(self.image_size)
        return self._processor

    def _pixels(self, data: bytes) -> bytes:
        from ziya_model.processing import decode_image, decode_pixels

        if self.mode == "fast":
            pixels = decode_pixels(data, self.max_pixels, min_size=self.processor.image_size)
            return self.processor.preprocess_uint8(pixels).tobytes()
        image = decode_image(data, self.max_pixels)
        return self.processor([image])[0].numpy().astype("float32").tobytes()

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ziya_model.processing import ImageDecodeError, ImageTooLarge

        check_columns("PreprocessStage", batch, INPUT_COLUMNS)
        status = batch.column("status").to_pylist()
        error = batch.column("error").to_pylist()
        pixels: list[bytes | None] = []
        for i, data in enumerate(batch.column("image_bytes").to_pylist()):
            if status[i] != OK or data is None:
                pixels.append(None)
                continue
            try:
                pixels.append(self._pixels(data))
            except ImageTooLarge as err:
                status[i], error[i] = TOO_LARGE, str(err)
                pixels.append(None)
            except ImageDecodeError as err:
                status[i], error[i] = DECODE_ERROR, str(err)
                pixels.append(None)
        out = batch.drop_columns([c for c in ("image", "image_bytes") if c in batch.column_names])
        out = set_column(out, "status", status, pa.string())
        out = set_column(out, "error", error, pa.string())
        return set_column(out, "pixels", pixels, pa.binary())
