"""A self-contained HTML report of one run's output: summary, charts, gallery, failures.

    ziya-batch report OUTPUT_URI --out report.html [--sample 200] [--job job.yaml | --endpoint-url URL]

Reads the output through `pipeline.output.layout`, the route every reader of the output takes
(see ARCHITECTURE.md, "Output layout"): the committed shards (`layout.committed`: a shard's
data file under shards/ is its commit, staging is never read), their `_stats/` files and the
`_summary.json` / `_SUCCESS` markers, with the job's `StorageConfig` (endpoint, region,
anonymous access), so a run still in progress, or interrupted, is reported from what is
committed. An incremental output (OUT/runs/<run_id>/) is reported as its newest-answer view
over every run, the view `ziya-batch merge` writes (the page says how many runs it merges).

Memory: shards are streamed (a few at a time); what grows with the output is the status
counts' and histograms' values (a number or two per row) and, for an incremental output, the
key hashes of every run after the oldest (`merge.NewestFilter`, about 10 bytes per row of
those runs). The gallery, the failed-row list and the least-confident list are bounded.

The page has no external assets and makes no requests: CSS and JS are inline, charts are SVG
drawn here, thumbnails are base64 JPEGs. Every value from the data (answers, questions, errors,
ids, pass-through columns) is untrusted text: it is HTML-escaped, and the little data handed to
the page's script is JSON with `<`, `>`, `&`, U+2028 and U+2029 escaped.
"""

from __future__ import annotations

import base64
import contextlib
import heapq
import html
import io
import json
import math
import re
import zlib
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import split_protocol
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.columns import OUTPUT_COLUMNS
from pipeline.config import StorageConfig
from pipeline.output import layout
from pipeline.output.merge import KEY, NewestFilter
from pipeline.runtime.efficiency import rows as efficiency_rows
from pipeline.storage import filesystem, join, protocol_of

# Output columns every shard has (pipeline/columns.py); anything else is a manifest pass-through
# column, shown under each gallery item.
CORE_COLUMNS = ("id", *OUTPUT_COLUMNS)
# `least_confident`: the least confident answers of the whole run get their own section (a random
# sample of a million rows would rarely show the doubtful ones): the point of a confidence column.
MAX_FAILED_LISTED = 1000
THUMB_PX = 160
MAX_THUMB_SOURCE_BYTES = 64 * 1024 * 1024  # a bigger object is not worth decoding for a thumbnail
MAX_THUMB_SOURCE_PIXELS = 64_000_000
# Statuses of rows whose image the run fetched (so it passed the job's location policy):
# `invalid_path` was refused, `invalid_question` never fetched, `too_large` not worth it.
THUMB_STATUSES = frozenset({"ok", "fetch_error", "decode_error", "inference_error"})
MAX_CELL_CHARS = 2000  # a pass-through value or error longer than this is cut in the page


@dataclass
class RunData:
    """What the report shows, gathered in one streaming pass over the committed shards."""

    output: str
    shards: list[str]
    stats: list[dict[str, Any]]
    summary: dict[str, Any] | None
    finished: bool
    rows: int = 0
    statuses: Counter = field(default_factory=Counter)
    answer_chars: list[np.ndarray] = field(default_factory=list)
    row_latency: list[np.ndarray] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    failed_total: int = 0
    sample: list[dict[str, Any]] = field(default_factory=list)
    doubtful: list[dict[str, Any]] = field(default_factory=list)  # least confident, ascending
    extra_columns: list[str] = field(default_factory=list)
    model: str | None = None
    task: str | None = None
    generation: str | None = None
    warnings: list[str] = field(default_factory=list)
    storage: StorageConfig = field(default_factory=StorageConfig)
    runs: list[str] = field(default_factory=list)  # incremental runs merged, oldest first
    replaced: int = 0  # rows of older runs hidden by a later run's answer


def _read_shards(
    shards: list[layout.CommittedShard], storage: StorageConfig, window: int = 8
) -> Iterator[Any]:
    """The table of each committed shard in order, or the exception that made it unreadable.

    Reads run `window` ahead on threads (object storage is latency-bound); the window bounds
    how many shards sit in memory at once.
    """

    def read(s: layout.CommittedShard) -> Any:
        try:
            return layout.read_shard(s.run_uri, s.shard_id, storage)
        except (OSError, ValueError) as e:
            return e

    with ThreadPoolExecutor(max_workers=window) as pool:
        pending: deque = deque()
        for shard in shards:
            pending.append(pool.submit(read, shard))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _storage(storage: StorageConfig | None, endpoint_url: str | None) -> StorageConfig:
    """The job's storage options; `endpoint_url`, when given, replaces its endpoint."""
    storage = storage or StorageConfig()
    if endpoint_url:
        storage = storage.model_copy(update={"endpoint_url": endpoint_url})
    return storage


def _read_json(uri: str, storage: StorageConfig) -> dict[str, Any] | None:
    fs, path = filesystem(uri, storage)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _newest_filter(
    shards: list[layout.CommittedShard], runs: list[str], storage: StorageConfig
) -> NewestFilter:
    """The keys of every run after the oldest (only their id and question_index are read)."""
    view = NewestFilter(runs)
    later = [s for s in shards if s.run != runs[0]]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parts = list(
            pool.map(
                lambda s: (s.run, layout.read_shard(s.run_uri, s.shard_id, storage, list(KEY))),
                later,
            )
        )
    view.add_later_keys(parts)
    return view


def load_run(
    output_uri: str,
    sample: int,
    endpoint_url: str | None = None,
    seed: int = 0,
    least_confident: int = 0,
    storage: StorageConfig | None = None,
) -> RunData:
    """Read every committed shard once, keeping counts, distributions and a bounded sample.

    The shards are those of `layout.committed` (every run of an incremental output, whose
    newest answer per (id, question_index) is what counts: see `merge.NewestFilter`). The
    sample is bottom-k by a per-row random key seeded from (seed, shard), kept separately for
    failed and ok rows, so it is deterministic, independent of shard order, and needs memory
    for `sample` rows only. The `least_confident` ok rows of lowest `mean_logprob` in the whole
    output are kept the same way (bottom-k, streaming).
    """
    storage = _storage(storage, endpoint_url)
    shards = layout.committed(output_uri, storage)
    runs = list(dict.fromkeys(s.run for s in shards if s.run))
    if runs:
        # An incremental output: each run has its own markers; the latest one tells whether
        # the output is finished, and its summary is the last invocation's.
        last_run = join(output_uri, layout.RUNS_DIR, runs[-1])
        summary = _read_json(join(last_run, layout.SUMMARY), storage)
        finished = summary is not None and layout.exists(join(last_run, layout.SUCCESS), storage)
    else:
        summary = _read_json(join(output_uri, layout.SUMMARY), storage)
        finished = summary is not None and layout.exists(join(output_uri, layout.SUCCESS), storage)
    names = [f"{s.run}/{s.shard_id}" if s.run else s.shard_id for s in shards]
    run = RunData(output_uri, names, [], summary, finished, storage=storage, runs=runs)
    by_run: dict[str | None, list[str]] = {}
    for s in shards:
        by_run.setdefault(s.run, []).append(s.shard_id)
    stats_of: dict[tuple[str | None, str], dict] = {}
    for r, ids in by_run.items():
        run_uri = join(output_uri, layout.RUNS_DIR, r) if r else output_uri
        stats_of.update({(r, k): v for k, v in layout.read_stats(run_uri, ids, storage).items()})
    no_stats = sum(not v for v in stats_of.values())
    if no_stats:
        run.warnings.append(f"{no_stats} committed shards have no stats file: figures omit them")
    view = _newest_filter(shards, runs, storage) if len(runs) > 1 else None
    if runs:
        run.warnings.append(
            f"incremental output: the newest answer per (id, question) merged over {len(runs)} "
            f"run{'s' if len(runs) > 1 else ''} ({', '.join(runs)}, oldest first)"
        )
    best: dict[bool, list[tuple[float, int, int, dict]]] = {True: [], False: []}
    lowest: list[tuple[float, int, int, dict]] = []  # least confident ok answers, bottom-k
    reads = _read_shards(shards, storage)
    for si, (shard, name, got) in enumerate(zip(shards, names, reads, strict=True)):
        if isinstance(got, Exception):
            run.warnings.append(f"shard {name} unreadable, skipped: {type(got).__name__}: {got}")
            continue
        stats, table = stats_of.get((shard.run, shard.shard_id)) or {}, got
        run.stats.append(stats)
        if view is not None and table.num_rows:
            keep = view.keep(shard.run, table)
            run.replaced += int((~keep).sum())
            table = table.filter(pa.array(keep))
        table = table.drop_columns(
            [c for c in ("image_bytes", "pixels") if c in table.column_names]
        )
        # `questions` is where each row's `question` came from: showing it again adds nothing.
        run.extra_columns = [
            c for c in table.column_names if c not in CORE_COLUMNS and c != "questions"
        ]
        n = table.num_rows
        run.rows += n
        if n == 0:
            continue
        status = table.column("status").to_numpy(zero_copy_only=False).astype(str)
        run.statuses.update(Counter(status.tolist()))
        ok = status == "ok"
        answer = table.column("answer")
        if pa.types.is_null(answer.type):  # a shard where every answer is null
            answer = answer.cast(pa.string())
        answers = pc.fill_null(pc.utf8_length(answer), 0).to_numpy()
        run.answer_chars.append(answers[ok])
        if "latency_s" in table.column_names:
            lat = pc.fill_null(table.column("latency_s"), np.nan).to_numpy(zero_copy_only=False)
            run.row_latency.append(lat[~np.isnan(lat)])
        if run.model is None and "model" in table.column_names:
            run.model, run.generation = table.column("model")[0].as_py(), None
            if "generation" in table.column_names:
                run.generation = table.column("generation")[0].as_py()
            if "task" in table.column_names:
                run.task = table.column("task")[0].as_py()
        failed_idx = np.flatnonzero(~ok)
        run.failed_total += len(failed_idx)
        room = MAX_FAILED_LISTED - len(run.failed)
        if room > 0 and len(failed_idx):
            run.failed.extend(table.take(failed_idx[:room]).to_pylist())
        if "mean_logprob" in table.column_names and least_confident:
            lp = pc.fill_null(table.column("mean_logprob"), np.nan).to_numpy(zero_copy_only=False)
            idx = np.flatnonzero(ok & ~np.isnan(lp))
            idx = idx[np.argsort(lp[idx], kind="stable")[:least_confident]]
            rows = table.take(idx).to_pylist() if len(idx) else []
            cand = [(float(lp[i]), si, int(i), r) for i, r in zip(idx, rows, strict=True)]
            lowest = heapq.nsmallest(least_confident, lowest + cand, key=lambda t: t[:3])
        keys = np.random.default_rng([seed, zlib.crc32(name.encode())]).random(n)
        for is_ok in (True, False):
            idx = np.flatnonzero(ok == is_ok)
            idx = idx[np.argsort(keys[idx], kind="stable")[:sample]]
            rows = table.take(idx).to_pylist() if len(idx) else []
            cand = [(float(keys[i]), si, int(i), r) for i, r in zip(idx, rows, strict=True)]
            best[is_ok] = heapq.nsmallest(sample, best[is_ok] + cand, key=lambda t: t[:3])
    # Failed rows take up to half the gallery (or more when there are too few ok rows) so
    # that failures are always visible in it.
    n_failed = min(len(best[False]), max(sample // 2, sample - len(best[True])))
    chosen = best[False][:n_failed] + best[True][: sample - n_failed]
    run.sample = [r for *_, r in sorted(chosen, key=lambda t: (t[1], t[2]))]
    run.doubtful = [r for *_, r in lowest]
    if run.replaced:
        run.warnings.append(
            f"{run.replaced:,} older answers replaced by a later run are not counted or shown"
        )
    return run


def _epoch(value: Any) -> float | None:
    """`committed_at` as seconds since the epoch (a number, or an ISO 8601 string)."""
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def summarize(run: RunData) -> dict[str, Any]:
    """The run's headline numbers: _summary.json of a finished run (of its latest run for an
    incremental output), else computed from the committed shards' stats files.

    Without a summary, rates are measured between the first and the last commit (the stats
    files hold commit times, to the second): rows committed after the first commit over that
    span. With fewer than two commits a second apart there is no honest rate to show.
    """
    if run.finished and run.summary is not None:
        where = f"runs/{run.runs[-1]}/" if run.runs else ""
        latest = " (the latest run's)" if run.runs else ""
        return {**run.summary, "source": f"{where}{layout.SUMMARY}{latest}"}
    timed = sorted(
        ((t, s) for s in run.stats if (t := _epoch(s.get("committed_at"))) is not None),
        key=lambda ts: ts[0],
    )
    rate = wall = None
    if len(timed) >= 2 and timed[-1][0] - timed[0][0] >= 1:
        wall = timed[-1][0] - timed[0][0]
        after = [s for _, s in timed[1:]]
        rate = (
            sum(int(s.get("input_rows") or 0) for s in after) / wall,
            sum(int(s.get("tokens") or 0) for s in after) / wall,
        )
    return {
        "rows_in": sum(int(s.get("input_rows") or 0) for s in run.stats),
        "rows_out": sum(int(s.get("rows") or 0) for s in run.stats),
        "images_per_s": rate[0] if rate else None,
        "tokens_per_s": rate[1] if rate else None,
        "wall_s": wall,
        "wall_label": "first to last commit (s)",
        "model": run.model,
        "task": run.task,
        "generation": run.generation,
        "source": f"computed from {len(run.stats)} committed shards' stats files",
    }


def _esc(value: Any, limit: int = MAX_CELL_CHARS) -> str:
    """HTML-escape any value as text, cut to `limit` characters."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if len(text) > limit:
        text = text[:limit] + f"… ({len(text) - limit} more characters)"
    return html.escape(text, quote=True)


def _script_json(data: Any) -> str:
    """JSON that is safe inside a <script> element (no `</script>`, `<!--`, or JS line breaks)."""
    text = json.dumps(data, ensure_ascii=False)
    for ch, rep in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):  # fmt: skip
        text = text.replace(ch, rep)
    return text


def _num(value: Any, digits: int = 2) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) else _esc(value) or "–"


def bar_chart(counts: dict[str, int], title: str) -> str:
    """Horizontal SVG bar chart of status counts."""
    if not counts:
        return (
            f'<figure><figcaption>{_esc(title)}</figcaption><p class="muted">no rows</p></figure>'
        )
    top, bar_h, width = max(counts.values()) or 1, 22, 560
    items = sorted(counts.items(), key=lambda kv: (kv[0] != "ok", -kv[1], kv[0]))
    parts = []
    for i, (name, n) in enumerate(items):
        y, w = i * (bar_h + 6), max(1.0, 360 * n / top)
        cls = "ok" if name == "ok" else "bad"
        parts.append(
            f'<text x="150" y="{y + 16}" text-anchor="end">{_esc(name, 40)}</text>'
            f'<rect class="{cls}" x="156" y="{y}" width="{w:.1f}" height="{bar_h}"/>'
            f'<text x="{160 + w:.1f}" y="{y + 16}">{n:,}</text>'
        )
    h = len(items) * (bar_h + 6)
    return (f'<figure><figcaption>{_esc(title)}</figcaption><svg class="chart" role="img" '
            f'viewBox="0 0 {width} {h}" width="{width}" height="{h}">{"".join(parts)}</svg></figure>')  # fmt: skip


def histogram(values: np.ndarray, title: str, unit: str, bins: int = 20) -> str:
    """Vertical SVG histogram with the value range and the tallest bin's count labelled."""
    if values.size == 0:
        return (
            f'<figure><figcaption>{_esc(title)}</figcaption><p class="muted">no data</p></figure>'
        )
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:  # one distinct value: numpy would centre a unit range on it (negative latencies)
        hi = lo + max(abs(lo) * 0.1, 1e-6)
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    width, height, left, bottom = 560, 180, 40, 20
    bw, top = (width - left) / bins, int(counts.max()) or 1
    bars = "".join(
        f'<rect class="ok" x="{left + i * bw + 1:.1f}" y="{height - bottom - (height - bottom - 10) * c / top:.1f}" '
        f'width="{bw - 2:.1f}" height="{(height - bottom - 10) * c / top:.1f}"><title>'
        f"{edges[i]:.3g}–{edges[i + 1]:.3g} {_esc(unit)}: {c}</title></rect>"
        for i, c in enumerate(counts)
    )
    axis = (
        f'<line x1="{left}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" class="axis"/>'
        f'<text x="{left}" y="{height - 4}">{edges[0]:.3g}</text>'
        f'<text x="{width}" y="{height - 4}" text-anchor="end">{edges[-1]:.3g} {_esc(unit)}</text>'
        f'<text x="{left - 4}" y="18" text-anchor="end">{top}</text>'
    )
    caption = f"{_esc(title)} — n={values.size:,}, median {np.median(values):.3g} {_esc(unit)}"
    return (f'<figure><figcaption>{caption}</figcaption><svg class="chart" role="img" '
            f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">{bars}{axis}</svg></figure>')  # fmt: skip


def thumbnail(
    uri: str | None, storage: StorageConfig | None = None, fs: Any = None
) -> tuple[str | None, str]:
    """A ~160px base64 JPEG data URI of the image at `uri`, or (None, why there is none).

    `fs` is a filesystem for `uri`'s protocol to reuse (else one is made from `storage`)."""
    if not uri:
        return None, "no image URI"
    if split_protocol(uri)[0] not in (None, "file", "s3", "s3a", "gs", "gcs"):
        return None, "not fetched (remote URL)"
    try:
        made, path = filesystem(uri, storage)
        with (fs or made).open(path, "rb") as f:
            data = f.read(MAX_THUMB_SOURCE_BYTES + 1)
        if len(data) > MAX_THUMB_SOURCE_BYTES:
            return None, "image too large for a thumbnail"
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_THUMB_SOURCE_PIXELS:  # header only: no decode yet
                return None, f"image too large for a thumbnail ({im.width}x{im.height})"
            im.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))  # JPEG: decode at reduced scale
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            out = io.BytesIO()
            im.save(out, "JPEG", quality=70)
    except FileNotFoundError:
        return None, "image not found"
    except UnidentifiedImageError:
        return None, "not a decodable image"
    except Exception as e:  # any unreadable image becomes a placeholder, never a failed report
        return None, f"{type(e).__name__}: {e}"[:200]
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode(), ""


def gallery(run: RunData, rows: list[dict[str, Any]] | None = None) -> str:
    """One <article> per row (the sample unless `rows`): thumbnail, id, question, answer,
    confidence, status, error, extras."""
    doubtful = rows is not None  # the least-confident section: its own class, not a sample item
    rows = run.sample if rows is None else rows
    # Only images the run itself read (past its allowed-locations check) are read again: a
    # manifest can name any path, and the report must not embed what the job was refused.
    uris = sorted(
        {
            r["image"]
            for r in rows
            if isinstance(r.get("image"), str) and r.get("status") in THUMB_STATUSES
        }
    )
    # One filesystem per protocol (an s3fs instance per image would cost a session each).
    fss: dict[str, Any] = {}
    for u in uris:
        if protocol_of(u) not in fss:
            with contextlib.suppress(Exception):  # unusable: each thumbnail says why
                fss[protocol_of(u)] = filesystem(u, run.storage)[0]
    with ThreadPoolExecutor(max_workers=8) as pool:  # object storage reads are latency-bound
        found = pool.map(lambda u: thumbnail(u, run.storage, fss.get(protocol_of(u))), uris)
        thumbs = dict(zip(uris, found, strict=True))
    items = []
    for r in rows:
        why_not = "no image URI" if not r.get("image") else "not read by the run"
        src, why = thumbs.get(r.get("image"), (None, why_not))
        img = (f'<img src="{src}" alt="">' if src else
               f'<div class="placeholder" title="{_esc(why)}">no image<br><small>{_esc(why, 80)}</small></div>')  # fmt: skip
        status = str(r.get("status"))
        extras = "".join(
            f"<dt>{_esc(c)}</dt><dd>{_esc(r.get(c), 300)}</dd>"
            for c in run.extra_columns
            if r.get(c) not in (None, "", [])
        )
        err = f'<p class="error">{_esc(r.get("error"))}</p>' if r.get("error") else ""
        lp = r.get("mean_logprob")
        conf, lp_attr = "", ""
        if isinstance(lp, (int, float)) and math.isfinite(lp):
            lp_attr = f' data-logprob="{lp:.4f}"'
            conf = (f'<p class="confidence" title="mean token log-probability of the answer '
                    f'(model-relative, not a calibrated probability)">confidence {lp:.3f} '
                    f'<span class="muted">({_esc(r.get("num_tokens"))} tokens)</span></p>')  # fmt: skip
        items.append(
            f'<article class="{"lowconf" if doubtful else "item"} {"ok" if status == "ok" else "bad"}" data-status="{_esc(status)}"{lp_attr}>'
            f'{img}<div class="body"><p class="meta"><span class="status">{_esc(status)}</span> '
            f'<span class="{"lcid" if doubtful else "id"}">{_esc(r.get("id"))}</span>{_qlabel(r)}</p>'
            f'<p class="question">{_esc(r.get("question"))}</p>'
            f'<p class="answer">{_esc(r.get("answer"))}</p>{conf}{err}<dl>{extras}</dl></div></article>'
        )
    return "\n".join(items)


def _qlabel(r: dict[str, Any]) -> str:
    """Which of the row's questions this is (VQA rows may ask several of one image)."""
    qi = r.get("question_index")
    if r.get("task") != "vqa" or not isinstance(qi, int):
        return ""
    return f' <span class="qi">q{qi + 1}</span>'


def failed_table(run: RunData) -> str:
    """Every failed row (up to MAX_FAILED_LISTED) with its status and error."""
    if not run.failed_total:
        return '<p class="muted">no failed rows</p>'
    shown = f" (first {len(run.failed):,} listed)" if run.failed_total > len(run.failed) else ""
    rows = "".join(
        f"<tr><td>{_esc(r.get('id'))}{_qlabel(r)}</td><td>{_esc(r.get('status'))}</td>"
        f"<td>{_esc(r.get('error'))}</td><td>{_esc(r.get('image'), 300)}</td></tr>"
        for r in run.failed
    )
    return (f'<p><b id="failed-count">{run.failed_total:,}</b> failed rows{shown}</p><table class="failed">'
            f"<tr><th>id</th><th>status</th><th>error</th><th>image</th></tr>{rows}</table>")  # fmt: skip


def render(run: RunData) -> str:
    """The whole page: the template with each {{slot}} filled in one pass."""
    s = summarize(run)
    runs = f" in {len(run.runs)} runs" if len(run.runs) > 1 else ""
    banner = (f'<div class="banner done">finished: {len(run.stats)} shards committed{runs}</div>'
              if run.finished else
              f'<div class="banner progress">run in progress or interrupted: {len(run.stats)} '
              f"shards committed{runs} (no _SUCCESS/_summary.json yet); figures below are from what is committed</div>")  # fmt: skip
    banner += "".join(f'<div class="banner warn">{_esc(w)}</div>' for w in run.warnings)
    gen = s.get("generation")
    if isinstance(gen, str):
        with contextlib.suppress(ValueError):  # not JSON: shown as the string it is
            gen = json.loads(gen)
    by_status = ", ".join(f"{k}: {v:,}" for k, v in sorted(run.statuses.items()))
    # _summary.json counts the last invocation only (a resumed run skips committed shards), so
    # the row counts by status always come from the committed shards themselves.
    facts = [
        ("rows in output", f"{run.rows:,}"),
        ("rows by status", _esc(by_status)),
        (
            "rows in / out (this run)" if run.finished else "rows in / out",
            f"{_num(s.get('rows_in'), 0)} / {_num(s.get('rows_out'), 0)}",
        ),
        ("images/s", _num(s.get("images_per_s"))),
        ("tokens/s", _num(s.get("tokens_per_s"))),
        (s.get("wall_label", "wall time (s)"), _num(s.get("wall_s"), 1)),
        ("model", _esc(s.get("model"))),
        ("task", _esc(s.get("task"))),
        ("generation", _esc(gen)),
        ("shards committed", _num(len(run.stats), 0)),
        ("output", _esc(run.output)),
        ("source", _esc(s["source"])),
    ]
    # Efficiency (_summary.json of a finished run only): tokens/s per GPU, busy, roofline.
    facts += [(_esc(k), _esc(v)) for k, v in efficiency_rows(s.get("efficiency"))]
    batch_lat = [float(x) for st in run.stats for x in (st.get("batch_latency_s") or [])]
    lat = np.asarray(batch_lat) if batch_lat else np.concatenate([np.zeros(0), *run.row_latency])
    lat_title = "per-batch latency" if batch_lat else "per-row latency"
    charts = (bar_chart(dict(run.statuses), "rows by status (committed shards)")
              + histogram(np.concatenate([np.zeros(0), *run.answer_chars]), "answer length (ok rows)", "chars")
              + histogram(lat, lat_title, "s"))  # fmt: skip
    sample_statuses = Counter(str(r.get("status")) for r in run.sample)
    buttons = '<button type="button" class="filter active" data-status="">all</button>' + "".join(
        f'<button type="button" class="filter" data-status="{_esc(k)}">{_esc(k)} ({v})</button>'
        for k, v in sorted(sample_statuses.items(), key=lambda kv: (kv[0] != "ok", kv[0]))
    )
    slots = {
        "title": _esc(f"ziya-batch report — {run.output}"),
        "banner": banner,
        "summary": "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts),
        "charts": charts,
        "filters": buttons,
        "sample_size": f"{len(run.sample):,} of {run.rows:,}",
        "doubtful": gallery(run, run.doubtful)
        if run.doubtful
        else '<p class="muted">none listed (no answer confidence in this output, or the '
        "report was written with least_confident=0)</p>",
        "gallery": gallery(run),
        "failed": failed_table(run),
        "data": _script_json({"sample": len(run.sample), "statuses": dict(sample_statuses)}),
    }
    template = (
        resources.files("pipeline.output").joinpath("report_template.html").read_text("utf-8")
    )
    # One pass, so a slot's content (untrusted text included) is never scanned for slots again.
    return re.sub(r"\{\{(\w+)\}\}", lambda m: slots[m.group(1)], template)


def write_report(
    output_uri: str,
    out_path: str | Path,
    sample: int = 200,
    endpoint_url: str | None = None,
    seed: int = 0,
    least_confident: int = 0,
    storage: StorageConfig | None = None,
) -> str:
    """Write the HTML report of the run at `output_uri` to the local file `out_path`.

    `storage` is the job's `storage:` section (endpoint, region, anonymous access);
    `endpoint_url`, when given, replaces its endpoint. `least_confident` > 0 adds a section
    with that many ok answers of lowest confidence in the whole run (the CLI shows 24), beside
    the random gallery sample.
    """
    run = load_run(
        output_uri,
        max(0, sample),
        endpoint_url=endpoint_url,
        seed=seed,
        least_confident=max(0, least_confident),
        storage=storage,
    )
    page = render(run)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return str(out)
