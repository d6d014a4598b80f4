"""Small jobs over the session's moto S3 for the fault and resume tests.

    bucket = seed_bucket(moto_endpoint, "fault-runs", photo_dir)    # photos + a poison image
    put_manifest(moto_endpoint, bucket, "m/a.parquet", ids, images)
    job = make_job(moto_endpoint, bucket, tiny, "m/", "out/x", rows_per_shard=4)
    before = listing(moto_endpoint, bucket, "out/x/")               # key -> (ETag, LastModified)

Images are the real photographs of the `photo_dir` fixture; `poison.jpg` is a uniform colour
square, which `tests.support.counting.CountingLoader(poison=True)` treats as a row that crashes
its worker every time.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.config import JobConfig, parse_job
from tests.support import s3

POISON = "poison.jpg"


def seed_bucket(endpoint: str, bucket: str, photo_dir: Path) -> str:
    """Create `bucket` with images/<photo>.jpg for each photograph and images/poison.jpg."""
    s3.create_bucket(endpoint, bucket)
    for photo in sorted(photo_dir.glob("*.jpg")):
        s3.upload_file(endpoint, photo, bucket, f"images/{photo.name}")
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (200, 40, 160)).save(buf, "JPEG", quality=95)
    s3.put_bytes(endpoint, bucket, f"images/{POISON}", buf.getvalue())
    return bucket


def photo_uris(bucket: str, photo_dir: Path) -> list[str]:
    return [f"s3://{bucket}/images/{p.name}" for p in sorted(photo_dir.glob("*.jpg"))]


def manifest_table(ids: list[str], images: list[str], **extra: list[Any]) -> pa.Table:
    return pa.table({"id": ids, "image": images, **extra})


def put_manifest(
    endpoint: str, bucket: str, key: str, ids: list[str], images: list[str], **extra: list[Any]
) -> str:
    """Write a caption manifest (id, image, extra columns) as one Parquet object."""
    buf = io.BytesIO()
    pq.write_table(manifest_table(ids, images, **extra), buf, row_group_size=4)
    s3.put_bytes(endpoint, bucket, key, buf.getvalue())
    return f"s3://{bucket}/{key}"


def make_job(
    endpoint: str,
    bucket: str,
    tiny: Any,
    manifest: str,
    out: str,
    rows_per_shard: int = 4,
    **sections: dict[str, Any],
) -> JobConfig:
    """A caption job over s3://bucket/<manifest> writing s3://bucket/<out>, tiny local model.

    `sections` update the job's sections key by key (e.g. run={"mode": "retry_failed"}).
    """
    data: dict[str, Any] = {
        "name": "faults",
        "input": {"uri": f"s3://{bucket}/{manifest}"},
        "output": {"uri": f"s3://{bucket}/{out}", "rows_per_shard": rows_per_shard},
        "task": {"kind": "caption", "caption_prompt": "Describe the image."},
        "model": {"visual": str(tiny.visual_dir), "llm": str(tiny.llm_dir)},
        "generation": {"max_new_tokens": 4},
        "resources": {"actors": 1, "batch_size": 4, "preprocess_batch_size": 4},
        "storage": {"endpoint_url": endpoint, "region": s3.REGION},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_job(data)


def listing(endpoint: str, bucket: str, prefix: str) -> dict[str, tuple[str, Any]]:
    """key -> (ETag, LastModified) of every object under `prefix`."""
    out = {}
    pages = s3.client(endpoint).get_paginator("list_objects_v2")
    for page in pages.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = (obj["ETag"], obj["LastModified"])
    return out
