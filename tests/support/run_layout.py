"""Write a run's output in the exact layout of ARCHITECTURE.md ("Output layout") by hand.

Used by the report tests: real Parquet written with pyarrow, real photographs from
`skimage.data` saved as JPEGs and referenced by the `image` column, failed rows of several
kinds (a missing image, a zero-byte file, an undecodable file, an invalid question, a
refused location), one answer
that is an HTML/script injection attempt, and one shard left uncommitted the way a killed run
leaves it: its rows staged under `_staging/`, its stats file written but not its data file
under `shards/`, and a writer's hidden temp file beside the committed shards.

    layout = write_layout(tmp_path / "out", tmp_path / "images")
    layout.rows            # the committed rows, as written (expected values come from these)
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# Both the <script> and the onerror handler would set window.__pwned if the page ran them.
INJECTION = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2"> {{gallery}}'
SEARCH_TOKEN = "zqxcat"  # appears only in the answers about the cat photograph
MODEL = "ziya-visual-tiny"
GENERATION = json.dumps({"max_new_tokens": 16, "do_sample": False}, sort_keys=True)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


@dataclass
class Layout:
    out: Path
    rows: list[dict]  # committed rows only
    uncommitted_ids: list[str]
    shard_ids: list[str]
    injection_id: str

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    @property
    def statuses(self) -> Counter:
        return Counter(r["status"] for r in self.rows)


def write_photos(images_dir: Path) -> dict[str, Path]:
    """Real photographs from scikit-image as JPEGs, plus a zero-byte and an undecodable file."""
    from skimage import data

    images_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in PHOTOS:
        path = images_dir / f"{name}.jpg"
        Image.fromarray(getattr(data, name)()).convert("RGB").save(path, quality=85)
        paths[name] = path
    # Real photographs that only rows whose image the run never read point at.
    for name in ("unfetched", "refused"):
        Image.fromarray(data.astronaut()).save(images_dir / f"{name}.jpg", quality=85)
    (images_dir / "empty.jpg").write_bytes(b"")
    (images_dir / "garbage.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg" * 10)
    paths["empty"] = images_dir / "empty.jpg"
    paths["garbage"] = images_dir / "garbage.jpg"
    return paths


def _row(i: int, image: str, kind: str) -> dict:
    ok = kind == "ok"
    subject = Path(image).stem
    answer = f"A photograph of {subject}."
    if subject == "chelsea":
        answer += f" The {SEARCH_TOKEN} sits still."
    errors = {
        "fetch_error": f"FileNotFoundError: {image}",
        "decode_error": "ImageDecodeError: cannot identify image file (0 bytes)",
        "invalid_question": "question is longer than 2000 characters",
        "invalid_path": f"location not allowed: {image}",
    }
    return {
        "id": f"img-{i:03d}",
        "image": image,
        "source": f"set-{i % 3}",  # a pass-through manifest column
        "task": "caption",
        "question_index": 0,
        "question": "Describe this image in one sentence.",
        "answer": answer if ok else None,
        "status": kind,
        "error": None if ok else errors[kind],
        "num_tokens": len(answer.split()) if ok else 0,
        "mean_logprob": -0.1 - 0.15 * (i % 11) if ok else None,
        "latency_s": 0.05 + 0.01 * (i % 7) if ok else None,
        "model": MODEL,
        "generation": GENERATION,
        "row_key": f"{zlib.crc32(f'img-{i:03d}'.encode()):08x}",
    }


def _write_shard(out: Path, shard_id: str, rows: list[dict], commit: bool, t0: float) -> None:
    """Commit order of pipeline/output/layout.py: `_stats/<id>.json`, then `shards/<id>.parquet`.

    Uncommitted: the rows staged by workers and the stats file, no data file (a crash between
    the two writes of the commit), and a half-written hidden temp file."""
    table = pa.Table.from_pylist(rows)
    if not commit:
        staged = out / "_staging" / shard_id
        staged.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, staged / "block-0.parquet")
        (out / "shards" / f".{shard_id}.parquet.0f0f.tmp").write_bytes(b"PAR1 half written")
    statuses = Counter(r["status"] for r in rows)
    stats = {
        "shard": shard_id,
        "rows": len(rows),
        "input_rows": len(rows),
        "statuses": dict(statuses),
        "tokens": sum(r["num_tokens"] for r in rows),
        "duration_s": 2.0,
        "committed_at": t0 + 2.0,
        "batch_latency_s": [0.2 + 0.05 * k for k in range(len(rows) // 4 + 1)],
    }
    (out / "_stats").mkdir(parents=True, exist_ok=True)
    (out / "_stats" / f"{shard_id}.json").write_text(json.dumps(stats))
    if commit:
        pq.write_table(table, out / "shards" / f"{shard_id}.parquet")


def write_layout(
    out: Path, images_dir: Path, image_prefix: str | None = None, finished: bool = True
) -> Layout:
    """Three shards of 12 rows: two committed, one not; `_SUCCESS` + `_summary.json` when
    `finished`.

    `image_prefix` replaces the images directory in the `image` URIs (for example
    `s3://bucket/images` when the images are uploaded there afterwards).
    """
    write_photos(images_dir)
    prefix = image_prefix.rstrip("/") if image_prefix else str(images_dir)

    def uri(name: str) -> str:
        return f"{prefix}/{name}.jpg"

    rows = []
    for i in range(36):
        kind = "ok"
        image = uri(PHOTOS[i % len(PHOTOS)])
        if i in (3, 17):
            kind, image = "fetch_error", uri(f"missing-{i}")
        elif i == 8:
            kind, image = "decode_error", uri("empty")
        elif i == 20:
            kind, image = "decode_error", uri("garbage")
        elif i == 11:
            kind, image = "invalid_question", uri("unfetched")
        elif i == 23:
            kind, image = "invalid_path", uri("refused")
        rows.append(_row(i, image, kind))
    rows[5]["answer"] = INJECTION
    rows[6]["source"] = "</script><marquee>moving pass-through</marquee>"
    (out / "shards").mkdir(parents=True, exist_ok=True)
    path_hash = f"{zlib.crc32(str(images_dir / 'manifest.parquet').encode()):08x}"
    shard_ids = [f"manifest-{path_hash}-{a:09d}-{a + 12:09d}" for a in (0, 12, 24)]
    t0 = 1_700_000_000.0
    for k, sid in enumerate(shard_ids):
        _write_shard(out, sid, rows[12 * k : 12 * k + 12], commit=k < 2, t0=t0 + 2.0 * k)
    committed = rows[:24]
    if finished:
        statuses = Counter(r["status"] for r in committed)
        summary = {
            "rows_in": 24,
            "rows_out": 24,
            "statuses": dict(statuses),
            "images_per_s": 6.0,
            "tokens_per_s": 31.5,
            "wall_s": 4.0,
            "output": str(out),
            "model": MODEL,
            "generation": json.loads(GENERATION),
            "task": "caption",
            "shards_total": 2,
            "shards_skipped": 0,
            "shards_committed": 2,
            "finished_at": "2026-01-01T00:00:00+00:00",
        }
        (out / "_summary.json").write_text(json.dumps(summary))
        (out / "_SUCCESS").write_text("")
    return Layout(out, committed, [r["id"] for r in rows[24:]], shard_ids[:2], rows[5]["id"])
