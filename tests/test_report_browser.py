"""The HTML run report opened in a real headless Chromium (through chromedriver).

    python -m pytest tests/test_report_browser.py -q

Checks what a person sees, for a finished tiny run of the real pipeline (tiny random-weight
model on local Ray, real photographs, a missing object and a zero-byte file among them) and for
a hand-written output layout holding an answer that is an HTML/script injection: the gallery's
visible items, status filter buttons and text search changing them to the exact expected
count, untrusted text shown literally with nothing executed, and screenshots saved to
test-artifacts/. Skipped only where chromium / chromedriver are not installed (.ci/run
installs them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.output.report import CORE_COLUMNS, write_report
from tests.support.browser import Browser, chromium_session, missing_browser
from tests.support.run_layout import INJECTION, SEARCH_TOKEN, write_layout

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(missing_browser() is not None, reason=str(missing_browser())),
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
VISIBLE = "return document.querySelectorAll('#gallery .item:not([hidden])').length"
# Both would set window.__pwned if the page ever ran them.
HTML_QUESTION = "What is <b>in</b> this picture? <script>window.__pwned=3</script>"
HTML_NOTE = '<img src=x onerror="window.__pwned=4"><i>note</i>'


def _visible_ids(b: Browser) -> list[str]:
    return b.execute(
        "return Array.from(document.querySelectorAll('#gallery .item:not([hidden]) .id'))"
        ".map(e => e.textContent)"
    )


def _check_filters(b: Browser, rows: list[dict]) -> None:
    """Each status's button shows exactly its rows; "all" brings every row back."""
    statuses = sorted({r["status"] for r in rows})
    assert "ok" in statuses and len(statuses) > 1, "the fixture must hold ok and failed rows"
    assert b.execute(VISIBLE) == len(rows)
    for status in statuses:
        b.click(b.find(f'button.filter[data-status="{status}"]'))
        expected = sorted(r["id"] for r in rows if r["status"] == status)
        assert b.execute(VISIBLE) == len(expected) < len(rows)
        assert sorted(_visible_ids(b)) == expected
    b.click(b.find('button.filter[data-status=""]'))
    assert b.execute(VISIBLE) == len(rows)


def _check_nothing_injected(b: Browser) -> None:
    assert b.execute("return typeof window.__pwned") == "undefined"
    injected = "#gallery script, #gallery [onerror], #gallery b, #gallery i, #gallery marquee"
    assert b.execute(f"return document.querySelectorAll('{injected}').length") == 0


def _search(b: Browser, query: str) -> list[str]:
    box = b.find("#search")
    b.clear(box)
    b.type(box, query)
    return sorted(_visible_ids(b))


def _clear_search(b: Browser) -> None:
    box = b.find("#search")
    b.clear(box)  # WebDriver's clear fires "change", not "input": tell the page as typing would
    b.execute("arguments[0].dispatchEvent(new Event('input'))", box)


def _thumbnail_sizes(b: Browser) -> list[list]:
    return b.execute(
        "return Array.from(document.querySelectorAll('#gallery img'))"
        ".map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
    )


def _screenshot(b: Browser, path: Path) -> None:
    height = b.execute("return document.documentElement.scrollHeight")
    b.set_window(1400, min(int(height) + 140, 6000))
    b.screenshot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tiny_run(tmp_path: Path, tiny_checkpoint, photo_dir: Path, ray_cluster) -> Path:
    """A finished run of the real pipeline: every photograph, a missing one, a zero-byte one."""
    from pipeline.builder import run
    from pipeline.config import parse_job

    images = tmp_path / "images"
    shutil.copytree(photo_dir, images)
    (images / "empty.jpg").write_bytes(b"")
    photos = sorted(p for p in images.glob("*.jpg") if p.name != "empty.jpg")
    rows = [
        {"id": f"photo-{p.stem}", "image": str(p), "questions": [HTML_QUESTION], "note": HTML_NOTE}
        for p in photos
    ]
    rows.append(
        {"id": "missing", "image": str(images / "nope.jpg"), "questions": ["q?"], "note": ""}
    )
    rows.append(
        {"id": "empty", "image": str(images / "empty.jpg"), "questions": ["q?"], "note": ""}
    )
    pq.write_table(pa.Table.from_pylist(rows), images / "manifest.parquet")
    job = parse_job(
        {
            "input": {"uri": str(images / "manifest.parquet")},
            "output": {"uri": str(tmp_path / "out"), "rows_per_shard": 3},
            "model": {
                "visual": str(tiny_checkpoint.visual_dir),
                "llm": str(tiny_checkpoint.llm_dir),
            },
            "task": {"kind": "vqa"},
            "generation": {"max_new_tokens": 8},
        }
    )
    summary = run(job)
    assert summary.rows_out == len(rows)
    return tmp_path / "out"


def test_report_of_tiny_run_in_chromium(tmp_path: Path, tiny_run: Path):
    shards = sorted((tiny_run / "shards").glob("*.parquet"))
    assert shards and (tiny_run / "_SUCCESS").exists()
    rows = pa.concat_tables([pq.read_table(p) for p in shards]).to_pylist()
    by_id = {r["id"]: r for r in rows}
    assert by_id["missing"]["status"] != "ok" and by_id["empty"]["status"] != "ok"
    report = Path(write_report(str(tiny_run), tmp_path / "report.html", sample=1000))

    with chromium_session(tmp_path) as b:
        b.get(report.resolve().as_uri())
        assert b.text(b.find("#visible-count")) == f"showing {len(rows)} of {len(rows)}"
        assert "finished: 3 shards committed" in b.text(b.find(".banner"))
        _check_filters(b, rows)
        labels = b.execute(
            "return Array.from(document.querySelectorAll('#gallery .qi'), e => e.textContent)"
        )
        assert labels == ["q1"] * len(rows)  # VQA items say which of the row's questions they show

        # Untrusted question and pass-through text read literally; nothing from them ran.
        questions = [b.text(e) for e in b.find_all("#gallery .item .question")]
        photos = [r for r in rows if r["id"].startswith("photo-")]
        assert questions.count(HTML_QUESTION) == len(photos)
        assert b.execute("return document.body.innerText").count(HTML_NOTE) == len(photos)
        _check_nothing_injected(b)

        # Search matches what the item shows (id, question, answer, error, pass-through).
        def shown(r: dict) -> str:
            extra = [v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                     for k, v in r.items() if k not in (*CORE_COLUMNS, "questions") and v not in (None, "", [])]  # fmt: skip
            return " ".join(
                [r["id"], r["question"] or "", r["answer"] or "", r["error"] or "", *extra]
            )

        expected = sorted(r["id"] for r in rows if "chelsea" in shown(r).lower())
        assert expected and _search(b, "CHELSEA") == expected
        _clear_search(b)
        assert b.execute(VISIBLE) == len(rows)

        sizes = _thumbnail_sizes(b)
        assert len(sizes) == sum(r["status"] == "ok" for r in rows)
        assert all(done and 0 < w <= 160 and 0 < h <= 160 for done, w, h in sizes)
        _screenshot(b, ARTIFACTS / "report.png")


def test_report_of_hand_written_layout_in_chromium(tmp_path: Path):
    layout = write_layout(tmp_path / "out", tmp_path / "images")
    report = Path(write_report(str(layout.out), tmp_path / "report.html", sample=1000))
    n = len(layout.rows)
    with chromium_session(tmp_path) as b:
        b.get(report.resolve().as_uri())
        assert b.text(b.find("#visible-count")) == f"showing {n} of {n}"  # the page's script ran
        _check_filters(b, layout.rows)

        # The injection answer reads as the literal text; nothing it contains ran.
        answers = [b.text(e) for e in b.find_all("#gallery .item .answer")]
        assert answers.count(INJECTION) == 1
        _check_nothing_injected(b)

        # Free-text search (case-insensitive), then combined with a status filter.
        with_token = sorted(r["id"] for r in layout.rows if SEARCH_TOKEN in (r["answer"] or ""))
        assert with_token and len(with_token) < n
        assert _search(b, SEARCH_TOKEN.upper()) == with_token
        b.click(b.find('button.filter[data-status="fetch_error"]'))
        assert b.execute(VISIBLE) == 0  # no failed row has an answer
        b.click(b.find('button.filter[data-status=""]'))
        _clear_search(b)
        assert b.execute(VISIBLE) == n

        # Thumbnails decoded in the browser (real JPEG data), placeholders for unreadable images.
        sizes = _thumbnail_sizes(b)
        readable = [r for r in layout.rows if r["status"] == "ok"]
        assert len(sizes) == len(readable)
        assert all(done and 0 < w <= 160 and 0 < h <= 160 for done, w, h in sizes)
        _screenshot(b, ARTIFACTS / "report-layout.png")
