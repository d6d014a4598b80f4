"""Removing secrets from text before it reaches a log, an output row or a summary.

Errors from storage clients quote URLs, headers and sometimes credentials: a presigned URL
carries `X-Amz-Credential` and `X-Amz-Signature`, a botocore debug line carries the
`Authorization` header, an STS error can echo a session token. Every error message the
pipeline stores goes through `redact` (or `describe_error`), and log handlers can carry
`RedactingFilter`.

Two layers: patterns for the shapes secrets have (access key ids, signatures, tokens, URL
userinfo, private keys), and the literal values of secret-looking environment variables
(`*SECRET*`, `*TOKEN*`, `*PASSWORD*`, `AWS_ACCESS_KEY_ID`, ...), which catches a secret in
any shape as long as it came from the environment, as credentials on clusters do.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import quote, quote_plus

MASK = "[REDACTED]"

# Values that follow a key name: a header `Key: value`, `key=value`, JSON/dict `"key": "value"`,
# a Python bytes repr `'Key': b'value'`, or XML `<Key>value`.
_SEP = r"""(["']?\s*[:=>]\s*(?:b(?=["']))?["']?)"""

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # PEM private keys, whole block.
    (
        re.compile(
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
            re.S,
        ),
        MASK,
    ),
    # Userinfo in URLs: scheme://user:password@host -> scheme://[REDACTED]@host.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@'\"<>]+@"), rf"\1{MASK}@"),
    # Signed-URL query parameters (AWS SigV4 and SigV2, GCS V4).
    (
        re.compile(
            r"(?i)\b((?:X-Amz-(?:Signature|Credential|Security-Token)"
            r"|X-Goog-(?:Signature|Credential)|AWSAccessKeyId|Signature)=)[^&\s\"'<>]+"
        ),
        rf"\1{MASK}",
    ),
    # Other credential-looking query parameters.
    (
        re.compile(
            r"(?i)([?&](?:access_token|token|sig|password|passwd|api_?key|secret)=)[^&\s\"'<>]+"
        ),
        rf"\1{MASK}",
    ),
    # Authorization headers, whatever the scheme (AWS4-HMAC-SHA256 ..., Basic ..., Bearer ...).
    (re.compile(r"(?i)\b((?:proxy-)?authorization" + _SEP + r")[^\"'\r\n]+"), rf"\1{MASK}"),
    # Secret keys and session tokens after their names (config files, env dumps, JSON, XML).
    (
        re.compile(
            r"(?i)\b((?:aws_)?(?:secret_?access_?key|secret_?key|session_?token|security_?token)"
            r"|x-amz-security-token|SecretAccessKey|SessionToken)"
            + _SEP
            + r"[A-Za-z0-9/+=%._\-]{8,}"
        ),
        rf"\1\2{MASK}",
    ),
    # Bearer tokens anywhere.
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=\-]{8,}"), rf"\1{MASK}"),
    # AWS access key ids (long-term AKIA, temporary ASIA, and the other IAM id prefixes).
    (
        re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA|AGPA|AIPA|ANPA|ANVA|APKA|ABIA|ACCA)[A-Z0-9]{16}\b"),
        MASK,
    ),
]

_SECRET_ENV_NAME = re.compile(r"(?i)(SECRET|TOKEN|PASSWORD|PASSWD|API_?KEY|PRIVATE_?KEY)")
# Variables named like secrets but holding a location, not a secret.
_NOT_SECRET_SUFFIX = ("_FILE", "_PATH", "_DIR", "_URI")
_MIN_ENV_VALUE = 8  # shorter values ("true", "1") would mask ordinary words


def secret_env_values(environ: dict[str, str] | None = None) -> list[str]:
    """The values to mask, longest first: secret-named variables (and encoded forms of them)."""
    environ = os.environ if environ is None else environ
    values: set[str] = set()
    for name, value in environ.items():
        upper = name.upper()
        is_secret = upper == "AWS_ACCESS_KEY_ID" or (
            _SECRET_ENV_NAME.search(upper) and not upper.endswith(_NOT_SECRET_SUFFIX)
        )
        if not is_secret or len(value) < _MIN_ENV_VALUE:
            continue
        # Secrets often reach messages inside URLs, where '/', '+' and '=' are percent-encoded.
        values.update({value, quote(value, safe=""), quote_plus(value)})
    return sorted(values, key=len, reverse=True)


def redact(text: object, environ: dict[str, str] | None = None) -> str:
    """Return `text` (made a str) with secrets replaced by `[REDACTED]`.

    `environ` defaults to `os.environ`, read at each call so credentials set later are covered.
    """
    out = text if isinstance(text, str) else str(text)
    for value in secret_env_values(environ):
        out = out.replace(value, MASK)
    for pattern, replacement in _PATTERNS:
        out = pattern.sub(replacement, out)
    return out


def describe_error(exc: BaseException, max_chars: int = 2000) -> str:
    """`Type: message` for an `error` column: redacted, one bounded string."""
    text = redact(f"{type(exc).__name__}: {exc}")
    if len(text) > max_chars:
        text = text[: max_chars - 15] + " ...[truncated]"
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the message, arguments and traceback of every record.

    Attach it to handlers (`handler.addFilter(RedactingFilter())`): a filter on a logger does
    not see records that propagate from child loggers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
