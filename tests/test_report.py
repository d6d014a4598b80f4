"""The HTML run report without a browser: layout reading, sampling, escaping, S3.

python -m pytest tests/test_report.py -q
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeline.output.report import _script_json, load_run, write_report
from tests.support.run_layout import INJECTION, MODEL, Layout, write_layout


class _Page(HTMLParser):
    """The elements of a page, as (tag, attrs) pairs, and the text of each gallery item."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.item_ids: list[str] = []
        self._in_id = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.elements.append((tag, a))
        self._in_id = tag == "span" and a.get("class") == "id"

    def handle_data(self, data):
        if self._in_id:
            self.item_ids.append(data)
            self._in_id = False

    def items(self) -> list[dict]:
        return [a for t, a in self.elements if t == "article" and "item" in (a.get("class") or "")]


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return write_layout(tmp_path / "out", tmp_path / "images")


def _report(uri: str, tmp_path: Path, **kw) -> tuple[str, _Page]:
    path = write_report(uri, tmp_path / "report.html", **kw)
    text = Path(path).read_text("utf-8")
    return text, _Page(text)


def test_finished_run_gallery_escaping_and_self_contained(layout: Layout, tmp_path: Path):
    text, page = _report(str(layout.out), tmp_path, sample=1000)

    # Every committed row is in the gallery; the uncommitted shard's rows are nowhere.
    assert len(page.items()) == len(layout.rows)
    assert sorted(page.item_ids) == sorted(r["id"] for r in layout.rows)
    for rid in layout.uncommitted_ids:
        assert rid not in text
    statuses = [a["data-status"] for a in page.items()]
    assert {s: statuses.count(s) for s in set(statuses)} == dict(layout.statuses)

    # The injection is text: escaped in the source, and no element or handler came from it.
    assert INJECTION.replace("{{gallery}}", "") not in text
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in text
    assert "&lt;/script&gt;&lt;marquee&gt;moving pass-through&lt;/marquee&gt;" in text
    assert "{{gallery}}" in text  # an answer's slot-like text is not expanded
    assert [t for t, _ in page.elements if t == "script"] == ["script", "script"]
    assert not [a for _, a in page.elements if any(k.startswith("on") for k in a)]
    assert "marquee" not in [t for t, _ in page.elements]

    # Self-contained: every image is an inline thumbnail, nothing points outside the file.
    imgs = [a["src"] for t, a in page.elements if t == "img"]
    readable = [r for r in layout.rows if r["status"] == "ok"]
    assert len(imgs) == len(readable) and all(s.startswith("data:image/jpeg;base64,") for s in imgs)
    assert text.count('class="placeholder"') == len(layout.rows) - len(readable)
    assert "image not found" in text and "not a decodable image" in text  # placeholder reasons
    # invalid_question / invalid_path: the run never read these real photographs; neither does
    # the report.
    assert text.count('title="not read by the run"') == 2
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<link" not in text and "@import" not in text

    # Summary from _summary.json; all failed rows listed with their errors.
    assert "finished: 2 shards committed" in text
    assert "in progress" not in text and "source</th><td>_summary.json" in text
    assert MODEL in text and "31.50" in text  # tokens_per_s from the summary
    failed = [r for r in layout.rows if r["status"] != "ok"]
    assert f'<b id="failed-count">{len(failed)}</b>' in text
    for r in failed:
        assert r["error"] in text
    assert text.count("<svg") == 3  # status bars, answer lengths, batch latencies


def test_in_progress_run_is_reported_from_committed_shards(tmp_path: Path):
    layout = write_layout(tmp_path / "out", tmp_path / "images", finished=False)
    text, page = _report(str(layout.out), tmp_path, sample=1000)
    assert "run in progress or interrupted: 2 shards committed" in text
    assert len(page.items()) == len(layout.rows)
    # Figures come from the stats files: 24 input rows over 2 shards spanning 4 s.
    assert "computed from 2 committed shards" in text
    assert "24 / 24" in text and "6.00" in text  # rows in/out, images/s
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(layout.statuses.items()))
    assert counts in text


def test_no_rate_without_two_commits_a_second_apart(tmp_path: Path):
    layout = write_layout(tmp_path / "out", tmp_path / "images", finished=False)
    for path in (layout.out / "_stats").glob("*.json"):
        stats = json.loads(path.read_text())
        path.write_text(json.dumps({**stats, "committed_at": "2026-01-01T00:00:00Z"}))
    text, page = _report(str(layout.out), tmp_path, sample=1000)
    assert "<th>images/s</th><td>–</td>" in text and len(page.items()) == len(layout.rows)


def test_unreadable_shard_is_named_and_skipped(layout: Layout, tmp_path: Path):
    [uncommitted] = {p.stem for p in (layout.out / "_stats").glob("*.json")} - set(layout.shard_ids)
    bad = layout.out / "shards" / f"{uncommitted}.parquet"
    bad.write_bytes(b"PAR1 truncated")  # committed (its data file exists), but unreadable
    text, page = _report(str(layout.out), tmp_path, sample=1000)
    assert f"shard {uncommitted} unreadable, skipped" in text
    assert len(page.items()) == len(layout.rows)


def test_sample_is_seeded_and_prefers_failed_rows(layout: Layout):
    n_failed = len(layout.rows) - layout.count("ok")
    runs = [load_run(str(layout.out), sample=4, seed=s) for s in (0, 0, 1)]
    ids = [[r["id"] for r in run.sample] for run in runs]
    assert ids[0] == ids[1] and ids[0] != ids[2]
    for run in runs:
        # Half the gallery is failed rows although they are 6 of 24.
        assert sum(r["status"] != "ok" for r in run.sample) == 2 < n_failed
        assert run.failed_total == n_failed and run.rows == len(layout.rows)
    # Fewer ok rows than room: failed rows fill the rest.
    assert len(load_run(str(layout.out), sample=22).sample) == 22


def test_empty_output_and_script_json_escaping(tmp_path: Path):
    text, page = _report(str(tmp_path / "nothing"), tmp_path)
    assert "run in progress or interrupted: 0 shards committed" in text and not page.items()
    payload = {"s": "</script><!-- \u2028 \u2029 & >"}
    encoded = _script_json(payload)
    assert "<" not in encoded and ">" not in encoded and "\u2028" not in encoded
    assert json.loads(encoded) == payload


def test_cli_writes_report(layout: Layout, tmp_path: Path, capsys):
    from jobs.cli import main

    out = tmp_path / "sub" / "r.html"
    assert main(["report", str(layout.out), "--out", str(out), "--sample", "5"]) == 0
    assert str(out) in capsys.readouterr().out
    assert len(_Page(out.read_text("utf-8")).items()) == 5


def test_report_from_s3(tmp_path: Path, monkeypatch):
    """Output and images in a moto S3 server over HTTP on 127.0.0.1, reached via --endpoint-url,
    then via the job file's `storage:` section (`--job`)."""
    import yaml

    from jobs.cli import main
    from tests.support.s3 import REGION, aws_env, moto_s3

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # a session fixture may have set it
    layout = write_layout(tmp_path / "out", tmp_path / "images", image_prefix="s3://runs/images")
    with moto_s3(set_env=False) as s3, aws_env():  # credentials only: the endpoint is the flag
        s3.create_bucket("runs")
        s3.upload_dir(layout.out, "runs", "job1/")
        s3.upload_dir(tmp_path / "images", "runs", "images/")
        text, page = _report("s3://runs/job1", tmp_path, sample=1000, endpoint_url=s3.endpoint_url)
        job = tmp_path / "job.yaml"
        job.write_text(
            yaml.safe_dump(
                {
                    "input": {"uri": "s3://runs/m.parquet"},
                    "output": {"uri": "s3://runs/job1"},
                    "model": {"visual": "v", "llm": "l"},
                    "storage": {"endpoint_url": s3.endpoint_url, "region": REGION},
                }
            )
        )
        by_job = tmp_path / "by-job.html"
        assert (
            main(
                [
                    "report",
                    "--job",
                    str(job),
                    "--out",
                    str(by_job),
                    "--sample",
                    "1000",
                    "--least-confident",
                    "0",
                ]
            )
            == 0
        )
    assert len(page.items()) == len(layout.rows)
    for rid in layout.uncommitted_ids:
        assert rid not in text
    readable = [r for r in layout.rows if r["status"] == "ok"]
    assert text.count("data:image/jpeg;base64,") == len(readable)
    assert "finished: 2 shards committed" in text
    # The same page from the job's storage options (the output URI taken from the job too).
    job_text = by_job.read_text("utf-8")
    assert len(_Page(job_text).items()) == len(layout.rows)
    assert job_text.count("data:image/jpeg;base64,") == len(readable)


def test_incremental_output_reports_newest_answers_of_every_run(tmp_path: Path):
    """OUT/runs/<run_id>/ (incremental mode): the newest answer per (id, question_index) over
    every run (ordered by their _run.json start time), the page saying how many runs it merges;
    the banner and summary follow the latest run."""
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    older = write_layout(out / "runs" / "bbb", tmp_path / "img1", finished=False)
    newer = write_layout(out / "runs" / "aaa", tmp_path / "img2")
    (out / "runs" / "bbb" / "_run.json").write_text(json.dumps({"started_at": 100.0}))
    (out / "runs" / "aaa" / "_run.json").write_text(json.dumps({"started_at": 200.0}))
    # The newer run relabeled only its second shard (ids 12..23): its first is not committed.
    (out / "runs" / "aaa" / "shards" / f"{newer.shard_ids[0]}.parquet").unlink()
    relabeled = out / "runs" / "aaa" / "shards" / f"{newer.shard_ids[1]}.parquet"
    table = pq.read_table(relabeled)
    answers = [None if a is None else f"NEWER {a}" for a in table.column("answer").to_pylist()]
    pq.write_table(table.set_column(table.column_names.index("answer"), "answer", [answers]),
                   relabeled)  # fmt: skip
    text, page = _report(str(out), tmp_path, sample=1000)
    assert "the newest answer per (id, question) merged over 2 runs (bbb, aaa, oldest first)" in (
        text.replace("&#x27;", "'")
    )
    assert "12 older answers replaced by a later run" in text
    # Each of the 24 ids once: 0..11 from the older run, 12..23 with the newer run's answers.
    assert sorted(page.item_ids) == sorted(r["id"] for r in older.rows)
    assert text.count("NEWER A photograph") == sum(r["status"] == "ok" for r in older.rows[12:])
    assert "finished: 3 shards committed in 2 runs" in text
    assert "runs/aaa/_summary.json (the latest run&#x27;s)" in text


def test_least_confident_answers_of_the_whole_run(layout: Layout, tmp_path: Path):
    """The lowest-confidence ok answers are found across every shard (not only in the random
    sample), lowest first, each with its confidence shown and a data-logprob to sort by."""
    ok = [r for r in layout.rows if r["status"] == "ok" and r["id"] not in layout.uncommitted_ids]
    want = sorted(ok, key=lambda r: (r["mean_logprob"], r["id"]))[:3]
    run = load_run(str(layout.out), sample=2, least_confident=3)
    assert [r["id"] for r in run.doubtful] == [r["id"] for r in want]
    text, page = _report(str(layout.out), tmp_path, sample=2, least_confident=3)
    low = [a for t, a in page.elements if t == "article" and "lowconf" in (a.get("class") or "")]
    assert [float(a["data-logprob"]) for a in low] == pytest.approx(
        [r["mean_logprob"] for r in want], abs=1e-4
    )
    assert len(page.items()) == 2  # the sample itself is unchanged
    assert 'id="sort"' in text and 'id="max-logprob"' in text and "confidence -" in text
