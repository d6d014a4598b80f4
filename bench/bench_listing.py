"""Planning a prefix of images without a manifest (`input.images`): time and driver memory.

    .venv/bin/python bench/bench_listing.py                   # 100,000 objects on moto
    .venv/bin/python bench/bench_listing.py --objects 20000 --chunk 5000

Starts moto on 127.0.0.1 (S3 over HTTP, as the tests do), fills s3://listing-bench/photos/ with
`--objects` empty `.jpg` keys in 100 nested prefixes (written into moto's backend directly, which
takes seconds instead of minutes of PUTs) plus one non-image object per prefix, then times
`pipeline.planning.manifest.plan(job)`: the paginated listing (ListObjectsV2, 1,000 keys a page), the
listing files written to OUT/_input/ and the shard plan. Prints the time, the per-object cost
and the driver's RSS growth, the same again for a second plan (a rerun: the listing files exist
and are not written again), then the Python heap peak of a third plan under tracemalloc (its
own pass: tracing slows planning about sevenfold). Most of the time is moto's: it answers each
page of ListObjectsV2 by scanning the bucket's keys (boto3's paginator alone over 5,000 keys:
~0.6 ms per object on a shared 2-core machine); S3 itself lists ~1,000 keys in tens of ms.

Measured 2026-12-01 on a shared 2-core machine (other test suites running):
  100,000 objects on moto: first plan 503 s = 5.0 ms per object (moto's ListObjectsV2 scans the
  bucket for every page: quadratic), driver RSS +192 MiB (moto's server lives in this process).
  The pipeline's own side (listing.plan_images over a stand-in page source, no moto): 100,000
  objects in 2.6 s = 26 us per object; Python heap peak 23.8 MiB = 250 B per object, which is
  one listing file's rows (LISTING_CHUNK_ROWS = 100,000): it stays there for larger prefixes.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _rss_mb()
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.02)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=None, help="listing rows per file")
    ap.add_argument("--rows-per-shard", type=int, default=1000)
    args = ap.parse_args()

    from moto.s3.models import s3_backends

    from pipeline.config import parse_job
    from pipeline.planning import listing
    from pipeline.planning.manifest import plan
    from tests.support.s3 import REGION, aws_env, create_bucket, start_moto

    if args.chunk:
        listing.LISTING_CHUNK_ROWS = args.chunk
    server, url = start_moto()
    bucket = "listing-bench"
    with aws_env(url):
        create_bucket(url, bucket)
        backend = s3_backends["123456789012"]["global"]
        t = time.time()
        for i in range(args.objects):
            backend.put_object(bucket, f"photos/{i % 100:03d}/{i:08d}.jpg", b"")
        for p in range(100):
            backend.put_object(bucket, f"photos/{p:03d}/README.txt", b"not an image")
        print(f"filled {args.objects:,} objects (+100 others) in {time.time() - t:.1f}s")
        job = parse_job(
            {
                "input": {"images": f"s3://{bucket}/photos/"},
                "output": {"uri": f"s3://{bucket}/out", "rows_per_shard": args.rows_per_shard},
                "model": {"visual": "/unused", "llm": "/unused"},
                "storage": {"endpoint_url": url, "region": REGION},
            }
        )
        for label in ("first plan", "rerun", "rerun under tracemalloc"):
            traced = "tracemalloc" in label  # ~7x slower: its own pass, for the heap peak only
            sampler = _Sampler()
            rss0 = _rss_mb()
            sampler.start()
            if traced:
                tracemalloc.start()
            t = time.time()
            p = plan(job)
            wall = time.time() - t
            sampler.stop = True
            sampler.join()
            if traced:
                _, heap_peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                print(
                    f"{label}: Python heap peak {heap_peak / 2**20:.1f} MiB "
                    f"({heap_peak / p.total_rows:.0f} B/object)"
                )
                continue
            print(
                f"{label}: {p.total_rows:,} images, {len(p.files)} listing files, "
                f"{len(p.shards):,} shards in {wall:.2f}s = {wall / p.total_rows * 1e6:.1f} us "
                f"per object; driver RSS {rss0:.0f} -> {sampler.peak:.0f} MiB "
                f"(+{sampler.peak - rss0:.0f}); VmHWM "
                f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
            )
    server.stop()


if __name__ == "__main__":
    main()
