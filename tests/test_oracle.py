"""The oracle: a tiny checkpoint trained to know the test photographs. Its known answers check the
whole path from a file to an answer (preprocessing, prompt layout, tokenization, row order)."""

from __future__ import annotations

import pytest
import torch

from ziya_model import load_ziya
from ziya_model.oracle import CAPTION_PROMPT, KNOWN_ANSWERS, probe_pairs
from ziya_model.probe import Pair, format_table, probe_layouts
from ziya_model.processing import decode_image, decode_pixels
from ziya_model.prompt import DEFAULT_LAYOUT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def oracle(oracle_checkpoint):
    return load_ziya(oracle_checkpoint.visual_dir, oracle_checkpoint.llm_dir)


def test_caption_prompt_is_the_pipelines_default():
    from pipeline.config import DEFAULT_CAPTION_PROMPT

    assert CAPTION_PROMPT == DEFAULT_CAPTION_PROMPT


def test_oracle_knows_every_answer_through_chat_and_answer_batch(oracle, photo_dir):
    model, tokenizer, processor = oracle
    photos = sorted(p.stem for p in photo_dir.glob("*.jpg"))
    right = total = 0
    # chat(): the exact (transformers-equal) preprocessing.
    for photo in photos:
        pixels = processor([decode_image((photo_dir / f"{photo}.jpg").read_bytes())])
        for question, answer in KNOWN_ANSWERS[photo].items():
            got = model.chat(tokenizer, pixels, question)
            assert got == answer, (photo, question)
            right += 1
    # answer_batch: the pipeline's fast path, every question of every photo in one batch.
    fast = torch.stack(
        [
            torch.from_numpy(
                processor.preprocess_uint8(
                    decode_pixels((photo_dir / f"{p}.jpg").read_bytes(), min_size=224)
                )
            )
            for p in photos
        ]
    )
    embeds = model.encode_images(processor.normalize(fast))
    rows = [(i, q, a) for i, p in enumerate(photos) for q, a in KNOWN_ANSWERS[p].items()]
    answers = model.answer_batch(
        tokenizer, [q for _, q, _ in rows], embeds, image_index=[i for i, _, _ in rows]
    )
    assert [a.text for a in answers] == [a for _, _, a in rows]
    right += len(rows)
    total = right
    print(f"\noracle: {right} of {total} known answers exact (chat + answer_batch)")


def test_probe_picks_the_trained_layout_by_a_clear_margin(oracle, photo_dir):
    model, tokenizer, processor = oracle
    images = {p.stem: p for p in sorted(photo_dir.glob("*.jpg"))}
    pairs = [
        Pair(p["image"], p["question"], p["answer"], tuple(map(tuple, p.get("history", ()))))
        for p in probe_pairs(images)
    ]
    scores = probe_layouts(model, tokenizer, processor, pairs)
    print("\n" + format_table(scores))
    assert scores[0].layout == DEFAULT_LAYOUT
    assert scores[0].exact == len(pairs)
    assert scores[0].mean_loglik - scores[1].mean_loglik > 0.25  # measured: 0.39


def test_pipeline_rows_carry_their_own_images_known_answers(
    ray_cluster, moto_endpoint, photo_dir, oracle_checkpoint, tmp_path
):
    """Caption and multi-question VQA jobs over a shuffled manifest (each photo several times)
    on local Ray + S3: a row answered with another row's image, pixels or prompt fails."""
    import io
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs

    from pipeline.builder import run
    from pipeline.config import parse_job
    from pipeline.output.layout import read_output
    from ziya_model.oracle import COLOR_QUESTION, WHAT_QUESTION

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_endpoint}, skip_instance_cache=True)
    fs.mkdir("oracle")
    photos = sorted(p.stem for p in photo_dir.glob("*.jpg"))
    for p in photos:
        fs.put_file(str(photo_dir / f"{p}.jpg"), f"oracle/images/{p}.jpg")
    fs.put(str(oracle_checkpoint.visual_dir), "oracle/model/visual", recursive=True)
    fs.put(str(oracle_checkpoint.llm_dir), "oracle/model/llm", recursive=True)
    rows = [(f"{p}-{k}", p) for p in photos for k in range(2)]
    random.Random(12).shuffle(rows)
    manifest = pa.table(
        {"id": [i for i, _ in rows], "image": [f"s3://oracle/images/{p}.jpg" for _, p in rows]}
    )
    buf = io.BytesIO()
    pq.write_table(manifest, buf, row_group_size=5)
    fs.pipe_file("oracle/manifest/part-0.parquet", buf.getvalue())
    photo_of = dict(rows)

    checked = 0
    for kind, task in (
        ("caption", {"kind": "caption"}),
        ("vqa", {"kind": "vqa", "questions": [WHAT_QUESTION, COLOR_QUESTION]}),
    ):
        job = parse_job(
            {
                "name": f"oracle-{kind}",
                "input": {"uri": "s3://oracle/manifest/"},
                "output": {"uri": f"s3://oracle/out/{kind}", "rows_per_shard": 5},
                "task": task,
                "model": {
                    "visual": "s3://oracle/model/visual",
                    "llm": "s3://oracle/model/llm",
                    "cache_dir": str(tmp_path / "cache"),
                },
                "generation": {"max_new_tokens": 32},
                "resources": {"actors": 1, "batch_size": 4},
                "storage": {"endpoint_url": moto_endpoint},
            }
        )
        run(job)
        out = read_output(job.output.uri).to_pylist()
        assert len(out) == len(rows) * (1 if kind == "caption" else 2)
        for r in out:
            assert r["status"] == "ok", r
            assert r["answer"] == KNOWN_ANSWERS[photo_of[r["id"]]][r["question"]], r
        checked += len(out)
    print(f"\n{checked} of {checked} rows carry their own image's known answer")
