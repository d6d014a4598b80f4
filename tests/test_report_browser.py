"""The HTML run report opened in a real headless Chromium (through chromedriver).

    python -m pytest tests/test_report_browser.py -q

Checks what a person sees: the gallery's visible items, status filter buttons and text search
changing them to the exact expected count, the HTML-injection answer shown as literal text
with nothing executed, and a screenshot saved to test-artifacts/report.png.
Skipped only where chromium / chromedriver are not installed (.ci/run installs them).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.report import write_report
from tests.support.browser import Browser, chromium_session, missing_browser
from tests.support.run_layout import INJECTION, SEARCH_TOKEN, Layout, write_layout

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(missing_browser() is not None, reason=str(missing_browser())),
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
VISIBLE = "return document.querySelectorAll('#gallery .item:not([hidden])').length"


def _visible_ids(b: Browser) -> list[str]:
    return b.execute(
        "return Array.from(document.querySelectorAll('#gallery .item:not([hidden]) .id'))"
        ".map(e => e.textContent)"
    )


def _check_report(b: Browser, report: Path, layout: Layout, screenshot: Path) -> None:
    """Every assertion about one report of `layout`'s rows, all shown (sample >= rows)."""
    b.get(report.resolve().as_uri())
    n = len(layout.rows)
    assert b.execute(VISIBLE) == n
    assert b.text(b.find("#visible-count")) == f"showing {n} of {n}"  # the page's script ran

    # Each failing status's button shows exactly its rows; "all" brings everything back.
    failing = sorted(s for s in layout.statuses if s != "ok")
    assert failing, "the fixture must contain failed rows"
    for status in [*failing, "ok"]:
        b.click(b.find(f'button.filter[data-status="{status}"]'))
        expected = sorted(r["id"] for r in layout.rows if r["status"] == status)
        assert b.execute(VISIBLE) == len(expected) == layout.count(status)
        assert sorted(_visible_ids(b)) == expected
    b.click(b.find('button.filter[data-status=""]'))
    assert b.execute(VISIBLE) == n

    # The injection answer reads as the literal text; nothing it contains became an element
    # or ran (both the <script> and the onerror handler would set window.__pwned).
    answers = [b.text(e) for e in b.find_all("#gallery .item .answer")]
    assert answers.count(INJECTION) == 1
    assert b.execute("return typeof window.__pwned") == "undefined"
    assert (
        b.execute("return document.querySelectorAll('#gallery script, #gallery [onerror]').length")
        == 0
    )

    # Free-text search, alone and combined with a status filter.
    search = b.find("#search")
    b.type(search, SEARCH_TOKEN.upper())  # case-insensitive
    with_token = sorted(r["id"] for r in layout.rows if SEARCH_TOKEN in (r["answer"] or ""))
    assert with_token and len(with_token) < n
    assert sorted(_visible_ids(b)) == with_token
    b.click(b.find('button.filter[data-status="fetch_error"]'))
    assert b.execute(VISIBLE) == 0  # no failed row has an answer
    b.click(b.find('button.filter[data-status=""]'))
    b.clear(search)  # WebDriver's clear fires "change", not "input": tell the page as typing would
    b.execute("arguments[0].dispatchEvent(new Event('input'))", search)
    assert b.execute(VISIBLE) == n

    # Thumbnails decoded in the browser (real JPEG data), placeholders for unreadable images.
    sizes = b.execute(
        "return Array.from(document.querySelectorAll('#gallery img'))"
        ".map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
    )
    readable = [r for r in layout.rows if r["status"] in ("ok", "invalid_question")]
    assert len(sizes) == len(readable)
    assert all(done and 0 < w <= 160 and 0 < h <= 160 for done, w, h in sizes)

    height = b.execute("return document.documentElement.scrollHeight")
    b.set_window(1400, min(int(height) + 140, 6000))
    b.screenshot(screenshot)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_in_chromium(tmp_path: Path):
    layout = write_layout(tmp_path / "out", tmp_path / "images")
    report = Path(write_report(str(layout.out), tmp_path / "report.html", sample=1000))
    with chromium_session(tmp_path) as b:
        _check_report(b, report, layout, ARTIFACTS / "report.png")
