"""Cleaning untrusted text: questions from manifests, and any string bound for Parquet.

Manifests come from other teams and scrapers, so a question may be missing, not a string,
raw bytes in some other encoding, full of control or zero-width characters, or carry a lone
UTF-16 surrogate (from JSON such as "\\ud800"). Arrow refuses to encode a lone surrogate and
fails the whole block, so every string this pipeline writes goes through `sanitize_for_arrow`,
and every question through `clean_text`, which also decides when a question is unusable.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any

# Zero-width characters that render as nothing but change tokenization (and can smuggle text).
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))
_KEEP_CONTROLS = {"\n", "\t"}


def fix_surrogates(text: str) -> str:
    """Join valid surrogate pairs into their character and replace lone ones with U+FFFD."""
    try:
        text.encode("utf-8")
        return text  # the common case: nothing to fix, no copy
    except UnicodeEncodeError:
        pass
    # UTF-16 with surrogatepass turns a high+low pair into the real code point on decode;
    # what is left unpaired becomes U+FFFD through errors="replace".
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _strip_controls(text: str) -> str:
    text = text.replace("\r\n", "\n").translate(_ZERO_WIDTH)
    return "".join(ch for ch in text if ch in _KEEP_CONTROLS or unicodedata.category(ch) != "Cc")


def clean_text(value: Any, max_chars: int) -> tuple[str | None, str | None]:
    """Clean one question; return `(text, problem)`.

    `text is None` means the value is unusable and `problem` says why (the caller marks the
    row `invalid_question` with it). When `text` is set, `problem` is normally None; it is a
    note only when the input had to be repaired in a way the user should hear about (bytes
    that were not UTF-8, lone surrogates), so the caller can log or keep it.

    Steps: bytes are decoded as UTF-8 (bad bytes become U+FFFD); lone surrogates are replaced;
    control characters other than newline and tab, and zero-width characters, are removed; the
    text is NFC-normalized and stripped. Empty results and results longer than `max_chars`
    (counted after cleaning, in code points) are problems.
    """
    note: str | None = None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, "missing question"
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            value = raw.decode("utf-8", "replace")
            note = "question was not valid UTF-8; undecodable bytes were replaced"
    if not isinstance(value, str):
        return None, f"question is not text ({type(value).__name__})"
    fixed = fix_surrogates(value)
    # A valid pair joined into one character is not worth a note; a replaced lone one is.
    if note is None and fixed.count("\ufffd") > value.count("\ufffd"):
        note = "question had lone UTF-16 surrogates; they were replaced"
    text = unicodedata.normalize("NFC", _strip_controls(fixed)).strip()
    if not text:
        return None, "empty question"
    if len(text) > max_chars:
        return None, f"question too long ({len(text)} chars > {max_chars})"
    return text, note


def sanitize_for_arrow(value: Any) -> Any:
    """Return `value` with every string in it safe for Arrow/Parquet (surrogates replaced).

    Walks lists, tuples and dict values/keys (pass-through columns may be nested); bytes and
    other types are returned unchanged. Only surrogates are touched: Arrow accepts every other
    code point, including NUL and control characters, so pass-through data stays as it was.
    """
    if isinstance(value, str):
        return fix_surrogates(value)
    if isinstance(value, list):
        return [sanitize_for_arrow(v) for v in value]
    if isinstance(value, tuple):
        return tuple(sanitize_for_arrow(v) for v in value)
    if isinstance(value, dict):
        return {sanitize_for_arrow(k): sanitize_for_arrow(v) for k, v in value.items()}
    return value
