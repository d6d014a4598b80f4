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

import pyarrow as pa

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
    """Clean one question; return `(text, None)` or `(None, problem)`.

    Exactly one of the two is set: `problem` says why the value is unusable (the caller marks
    the question `invalid_question` with it). Repairs (bytes that were not UTF-8, lone
    surrogates) are not problems: the repaired text carries U+FFFD where the bad input was,
    which is visible in the output, and `repairs(value)` names them for a caller that logs.

    Steps: bytes are decoded as UTF-8 (bad bytes become U+FFFD); lone surrogates are replaced;
    control characters other than newline and tab, and zero-width characters, are removed; the
    text is NFC-normalized and stripped. Empty results and results longer than `max_chars`
    (counted after cleaning, in code points) are problems.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, "missing question"
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", "replace")
    if not isinstance(value, str):
        return None, f"question is not text ({type(value).__name__})"
    text = unicodedata.normalize("NFC", _strip_controls(fix_surrogates(value))).strip()
    if not text:
        return None, "empty question"
    if len(text) > max_chars:
        return None, f"question too long ({len(text)} chars > {max_chars})"
    return text, None


def repairs(value: Any) -> list[str]:
    """What `clean_text` had to repair in `value` (for logs): bad UTF-8, lone surrogates."""
    found = []
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            found.append("not valid UTF-8; undecodable bytes were replaced")
    # A valid pair joined into one character is no repair; a replaced lone one is.
    elif isinstance(value, str) and fix_surrogates(value).count("\ufffd") > value.count("\ufffd"):
        found.append("lone UTF-16 surrogates were replaced")
    return found


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


def _has_text(t: pa.DataType) -> bool:
    """Whether values of type `t` hold strings anywhere inside (lists, structs, maps)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return True
    return any(_has_text(t.field(i).type) for i in range(t.num_fields))


def _decoded(value: Any, t: pa.DataType) -> Any:
    """A Python value read through a binary view of type `t`, with its text decoded leniently."""
    if value is None:
        return None
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return bytes(value).decode("utf-8", "replace")
    if pa.types.is_map(t):
        return [(_decoded(k, t.key_type), _decoded(v, t.item_type)) for k, v in value]
    if pa.types.is_struct(t):
        return {f.name: _decoded(value[f.name], f.type) for f in t}
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return [_decoded(v, t.value_type) for v in value]
    return value


def _as_binary(t: pa.DataType) -> pa.DataType:
    """`t` with every string type replaced by the binary type of the same width."""
    if pa.types.is_string(t):
        return pa.binary()
    if pa.types.is_large_string(t):
        return pa.large_binary()
    if pa.types.is_map(t):
        return pa.map_(_as_binary(t.key_type), _as_binary(t.item_type))
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_as_binary(f.type)) for f in t])
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_as_binary(t.value_type)))
    if pa.types.is_large_list(t):
        return pa.large_list(t.value_field.with_type(_as_binary(t.value_type)))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(_as_binary(t.value_type)), t.list_size)
    return t


def repair_utf8(table: pa.Table) -> pa.Table:
    """`table` with invalid UTF-8 in its string columns (at any depth) replaced by U+FFFD.

    Parquet files written by other tools may hold bytes in string columns that are not UTF-8
    (Latin-1 text, a lone surrogate encoded as bytes). pyarrow reads them without complaint,
    but converting them to Python fails, and a reader of our output would fail the same way,
    so manifest rows are repaired as they are read. Valid columns are returned untouched
    (checking costs one validation pass); only a column that fails it is rebuilt.
    """
    for i, field in enumerate(table.schema):
        if not _has_text(field.type):
            continue
        column = table.column(i)
        try:
            column.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        raw = column.cast(_as_binary(field.type)).to_pylist()
        fixed = pa.array([_decoded(v, field.type) for v in raw], type=field.type)
        table = table.set_column(i, field, fixed)
    return table
