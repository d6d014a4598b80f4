"""`ziya-batch demo`: the whole pipeline on the oracle (a toy model) and real photographs.

    ziya-batch demo [--dir ziya-demo]

Writes into DIR: the oracle checkpoint in the real on-disk layout (`ziya_model.oracle`: a tiny
model trained in about a minute, once, to know only these photographs and a few questions;
it is no captioning model), JPEGs of the photographs scikit-image ships plus four broken
files, two manifests and two job files; then runs a caption job and a VQA job on a local Ray and
prints their summaries and how many answers equal the photographs' known answers. Rerun the
jobs yourself with `ziya-batch run DIR/caption.yaml`.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "camera", "coins", "hubble_deep_field")


def write_photos(image_dir: Path) -> list[Path]:
    """Real photographs shipped inside scikit-image, saved as JPEG, plus four broken files."""
    try:
        from skimage import data
    except ImportError:
        sys.exit("the demo needs scikit-image for its photographs: pip install 'ziya-batch[demo]'")
    from PIL import Image

    image_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        path = image_dir / f"{name}.jpg"
        if not path.exists():
            Image.fromarray(getattr(data, name)()).convert("RGB").save(path, quality=90)
        paths.append(path)
    good = paths[0].read_bytes()
    (image_dir / "empty.jpg").write_bytes(b"")
    (image_dir / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (image_dir / "not_an_image.jpg").write_text("this is a text file, not a JPEG\n")
    broken = [
        image_dir / n for n in ("missing.jpg", "empty.jpg", "truncated.jpg", "not_an_image.jpg")
    ]
    return paths + broken


def write_manifests(root: Path, images: list[Path]) -> tuple[Path, Path]:
    uris = [str(p.resolve()) for p in images]
    ids = [f"img-{i:03d}-{p.stem}" for i, p in enumerate(images)]
    caption = pa.table({"id": ids, "image": uris, "source": ["skimage.data"] * len(ids)})
    questions = [["图片里有什么？", "What is the main color of this picture?"]] * len(ids)
    vqa = pa.table({"id": ids, "image": uris, "questions": questions})
    (root / "manifests").mkdir(parents=True, exist_ok=True)
    cap_path, vqa_path = root / "manifests/caption.parquet", root / "manifests/vqa.parquet"
    pq.write_table(caption, cap_path)
    pq.write_table(vqa, vqa_path)
    return cap_path, vqa_path


def write_job(
    path: Path, manifest: Path, output: Path, images: Path, visual: str, llm: str, kind: str
) -> Path:
    job = {
        "name": f"demo-{kind}",
        "input": {"uri": str(manifest.resolve())},
        "output": {"uri": str(output.resolve()), "rows_per_shard": 4},
        "task": {"kind": kind},
        "model": {"visual": visual, "llm": llm, "dtype": "fp32"},
        "generation": {"max_new_tokens": 48},
        "resources": {"actors": 1, "batch_size": 8},
        # Images may come only from here: anything else in the manifest ends as invalid_path.
        "limits": {"allowed_locations": [str(images.resolve()) + "/"]},
        "run": {"mode": "overwrite"},
    }
    path.write_text(yaml.safe_dump(job, sort_keys=False, allow_unicode=True))
    return path


def run_demo(directory: str) -> int:
    from jobs.run import format_summary, run_job
    from pipeline.config import load_job
    from pipeline.output.layout import read_output
    from ziya_model.oracle import KNOWN_ANSWERS, cached_oracle_checkpoint

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    print("Training the oracle once (about a minute on a CPU; reused on later runs)...", flush=True)
    tiny = cached_oracle_checkpoint(root / "oracle")
    images = write_photos(root / "images")
    cap_manifest, vqa_manifest = write_manifests(root, images)
    jobs = [
        write_job(
            root / f"{kind}.yaml",
            manifest,
            root / "output" / kind,
            root / "images",
            str(tiny.visual_dir),
            str(tiny.llm_dir),
            kind,
        )
        for kind, manifest in (("caption", cap_manifest), ("vqa", vqa_manifest))
    ]
    print(
        "The oracle is a toy model that knows only these photographs and questions: its answers"
        " check the pipeline (each row must get its own photograph's answer), not a model."
    )
    for job_file in jobs:
        summary = run_job(load_job(job_file))
        print(f"\n== {job_file.name} ==\n{format_summary(summary)}")
        table = read_output(summary.output)
        buf = io.StringIO()
        for row in table.slice(0, 3).to_pylist():
            buf.write(
                f"  {row['id']}: [{row['status']}] {row['question']!r} -> {row['answer']!r}\n"
            )
        print("first rows:\n" + buf.getvalue().rstrip())
        ok = [r for r in table.to_pylist() if r["status"] == "ok"]
        known = sum(
            r["answer"] == KNOWN_ANSWERS.get(r["id"].split("-", 2)[2], {}).get(r["question"])
            for r in ok
        )
        print(f"{known} of {len(ok)} answered rows carry their own photograph's known answer")
    print(
        f"\nParquet answers under {(root / 'output').resolve()}/*/shards/."
        f"\nReport: ziya-batch report {(root / 'output/caption').resolve()} --out report.html"
    )
    return 0
