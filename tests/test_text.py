"""Tests for pipeline/guards/text.py: question cleaning and Arrow-safe strings.

python -m pytest tests/test_text.py -q
"""

from __future__ import annotations

import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.guards.text import clean_text, fix_surrogates, repairs, sanitize_for_arrow

MAX = 50

# (input, expected text, expected problem): exactly one of text and problem is set.
CASES = [
    ("What is in the picture?", "What is in the picture?", None),
    ("  padded \n\t ", "padded", None),
    ("line one\r\nline two\tend", "line one\nline two\tend", None),
    ("bell\x07 nul\x00 esc\x1b[31m del\x7f c1\x85", "bell nul esc[31m del c1", None),
    ("zero\u200bwidth\u200c\u200djoin\u2060ers\ufeff", "zerowidthjoiners", None),
    ("\ufeff\u200b", None, "empty question"),
    ("cafe\u0301", "caf\u00e9", None),  # NFC: e + combining acute -> é
    ("\uff21\uff22", "\uff21\uff22", None),  # NFC, not NFKC: full-width letters stay
    ("emoji \U0001f600", "emoji \U0001f600", None),
    ("pair \ud83d\ude00 joined", "pair \U0001f600 joined", None),  # surrogate pair -> one char
    (
        "lone \ud800 high",
        "lone \ufffd high",
        None,
    ),
    (
        "lone low \udfff",
        "lone low \ufffd",
        None,
    ),
    ("\udc80", "\ufffd", None),
    ("问这是什么？".encode(), "问这是什么？", None),
    (
        b"latin-1 caf\xe9",
        "latin-1 caf\ufffd",
        None,
    ),
    (bytearray(b" ok "), "ok", None),
    (b"\xff\xfe", "\ufffd\ufffd", None),
    (b"", None, "empty question"),
    ("", None, "empty question"),
    ("   \n\t  ", None, "empty question"),
    ("\x00\x01\x02", None, "empty question"),
    (None, None, "missing question"),
    (float("nan"), None, "missing question"),
    (42, None, "question is not text (int)"),
    (["a", "b"], None, "question is not text (list)"),
    ("x" * MAX, "x" * MAX, None),
    ("x" * (MAX + 1), None, f"question too long ({MAX + 1} chars > {MAX})"),
    # Length is counted after cleaning: zero-width padding does not make it too long...
    ("x" * MAX + "\u200b" * 100, "x" * MAX, None),
    # ...and a composed character counts once.
    ("e\u0301" * MAX, "\u00e9" * MAX, None),
]


@pytest.mark.parametrize(("value", "text", "problem"), CASES)
def test_clean_text(value, text, problem):
    assert clean_text(value, MAX) == (text, problem)


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ("fine", []),
        ("pair \ud83d\ude00", []),
        ("already \ufffd here", []),
        ("lone \ud800", ["lone UTF-16 surrogates were replaced"]),
        ("caf\u00e9".encode(), []),
        (b"caf\xe9", ["not valid UTF-8; undecodable bytes were replaced"]),
        (None, []),
    ],
)
def test_repairs_names_what_was_fixed(value, found):
    assert repairs(value) == found


def test_cleaned_text_has_no_controls_zero_width_or_surrogates():
    hostile = "".join(chr(c) for c in range(0x00, 0x250)) + "\u200b\u200d\ufeff\ud800\udfff"
    text, _ = clean_text(hostile, 10_000)
    assert text is not None
    assert not any(unicodedata.category(ch) == "Cc" and ch not in "\n\t" for ch in text)
    assert not set(text) & set("\u200b\u200c\u200d\u2060\ufeff")
    text.encode("utf-8")  # raises if a surrogate survived
    assert text == unicodedata.normalize("NFC", text)


def test_fix_surrogates_returns_the_same_object_when_clean():
    s = "plain text é"
    assert fix_surrogates(s) is s


def test_sanitize_for_arrow_walks_nested_values():
    value = {"k\ud800": ["a\udfff", ("b", b"\xff", 3)], "n": None}
    assert sanitize_for_arrow(value) == {"k\ufffd": ["a\ufffd", ("b", b"\xff", 3)], "n": None}
    # Everything but surrogates is left alone (pass-through data is the user's).
    keep = "nul\x00 bell\x07 zw\u200b"
    assert sanitize_for_arrow(keep) == keep


HOSTILE = [
    "\ud800",
    "\udfff",
    "a\ud83d",  # high surrogate cut off from its pair
    "\ude00b",
    "\ud83d\ude00",
    "nul\x00inside",
    "\x1b[2J\x07",
    "\u200b\u200c\u200d\u2060\ufeff",
    "\u202etxt.exe",  # right-to-left override
    "\ufffe\uffff",  # noncharacters are valid UTF-8 and must pass through
    "\U0010ffff",
    "",
    "x" * 100_000,
]


def test_every_hostile_string_round_trips_through_parquet(tmp_path):
    # Arrow refuses the raw strings that carry surrogates: that is the failure we prevent.
    with pytest.raises((UnicodeEncodeError, pa.ArrowException)):
        pa.array(HOSTILE, type=pa.string())

    questions = [clean_text(s, 200_000) for s in HOSTILE]
    passthrough = [sanitize_for_arrow(s) for s in HOSTILE]
    nested = sanitize_for_arrow([[s, s] for s in HOSTILE])
    table = pa.table(
        {
            "question": pa.array([t for t, _ in questions], type=pa.string()),
            "problem": pa.array([p for _, p in questions], type=pa.string()),
            "passthrough": pa.array(passthrough, type=pa.string()),
            "nested": pa.array(nested, type=pa.list_(pa.string())),
        }
    )
    path = tmp_path / "hostile.parquet"
    pq.write_table(table, path)
    back = pq.read_table(path).to_pydict()

    assert back["passthrough"] == passthrough
    assert back["nested"] == nested
    assert back["question"] == [t for t, _ in questions]
    # Surrogates were replaced one for one; everything else is byte-identical.
    assert back["passthrough"][0] == "\ufffd" and back["passthrough"][2] == "a\ufffd"
    assert back["passthrough"][4] == "\U0001f600"
    assert back["passthrough"][5:] == HOSTILE[5:]
    # Only the zero-width-only string and "" are unusable as questions.
    assert [i for i, (t, _) in enumerate(questions) if t is None] == [7, 11]
    assert {p for t, p in questions if t is None} == {"empty question"}
