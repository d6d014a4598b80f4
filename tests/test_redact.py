"""Tests for pipeline/guards/redact.py: secrets never survive into messages or logs.

python -m pytest tests/test_redact.py -q
"""

from __future__ import annotations

import io
import logging

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config

from pipeline.guards.redact import MASK, RedactingFilter, describe_error, redact, secret_env_values
from tests.support.s3 import moto_s3

# Canaries: unique strings that must appear nowhere after redaction.
KEY_ID = "AKIAZCANARY7Q2W3E4R5"
SECRET = "zCanarySecret/k9+Xw2bV8nM4pQ7rT1yU6iO3e0A"  # 40 chars, base64 alphabet
TOKEN = "FwoGZXIvYXdzECanaryTokenIQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQ"


@pytest.fixture
def canary_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    monkeypatch.setenv("MY_DB_PASSWORD", "hunter2-canary-pw")
    monkeypatch.setenv("GH_TOKEN", "ghp_canary0123456789")
    monkeypatch.setenv("SHORT_SECRET", "abc")  # too short to mask safely
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/secrets/token")  # a location
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


# (message, substrings that must be gone, substrings that must stay); no env canaries here:
# these are the shapes the patterns alone must catch.
PATTERN_CASES = [
    ("key AKIAIOSFODNN7EXAMPLE used", ["AKIAIOSFODNN7EXAMPLE"], ["key ", " used"]),
    ("temp ASIAY34FZKBOKMUTVV7A!", ["ASIAY34FZKBOKMUTVV7A"], ["temp ", "!"]),
    (
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n",
        ["wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"],
        ["aws_secret_access_key = "],
    ),
    (
        '{"SecretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "x": 1}',
        ["wJalrXUtnFEMI"],
        ['"x": 1'],
    ),
    (
        "<SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY</SecretAccessKey>",
        ["wJalrXUtnFEMI"],
        ["</SecretAccessKey>"],
    ),
    ("<SessionToken>IQoJb3JpZ2luX2VjEJr+abc=</SessionToken>", ["IQoJb3JpZ2luX2VjEJr"], []),
    ("aws_session_token=IQoJb3JpZ2luX2VjEJrAAAA", ["IQoJb3JpZ2luX2VjEJr"], []),
    ("x-amz-security-token: IQoJb3JpZ2luX2VjEJrAAAA", ["IQoJb3JpZ2luX2VjEJr"], []),
    (
        "GET https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
        "&X-Amz-Security-Token=IQoJb3JpZ2luX2VjEJr%2Fabc"
        "&X-Amz-Signature=0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0 failed",
        ["AKIAIOSFODNN7EXAMPLE", "IQoJb3JpZ2luX2VjEJr", "0f1e2d3c4b5a6978"],
        ["https://b.s3.amazonaws.com/k.jpg?", "X-Amz-Date=20240101T000000Z", " failed"],
    ),
    (
        "https://storage.googleapis.com/b/o?X-Goog-Credential=sa%40p.iam&X-Goog-Signature=abcdef12",
        ["sa%40p.iam", "abcdef12"],
        ["storage.googleapis.com/b/o"],
    ),
    ("https://h/x?Signature=abc123&AWSAccessKeyId=xyz789", ["abc123", "xyz789"], []),
    ("https://h/x?a=1&access_token=tok123456&b=2", ["tok123456"], ["a=1", "&b=2"]),
    (
        "Authorization: AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20240101/us-east-1/s3/"
        "aws4_request, SignedHeaders=host, Signature=fe5f80f77d5fa3beca038a248ff027d0445342fe\nnext",
        ["AKIAIOSFODNN7EXAMPLE", "fe5f80f77d5fa3be", "SignedHeaders"],
        ["Authorization: ", "\nnext"],
    ),
    (
        "{'Authorization': b'AWS4-HMAC-SHA256 Credential=X/Y, Signature=abcd', 'Host': 'h'}",
        ["Credential=X/Y", "abcd"],
        ["'Host': 'h'"],
    ),
    ("proxy-authorization: Basic dXNlcjpwYXNz", ["Basic", "dXNlcjpwYXNz"], ["proxy-"]),
    ("authorization=bearer-style-value", ["bearer-style-value", "=b"], ["authorization="]),
    ("sent Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig ok", ["eyJhbGci", ".sig"], [" ok"]),
    (
        "cannot reach https://alice:s3cr3t-pw@example.com/img.jpg (timeout)",
        ["alice", "s3cr3t-pw"],
        ["https://", "@example.com/img.jpg (timeout)"],
    ),
    ("redis://:onlypassword@cache:6379/0", ["onlypassword"], ["@cache:6379/0"]),
    (
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
        ["MIIEpAIBAAKCAQEA"],
        [],
    ),
    # Things that look close but are not secrets stay intact.
    ("s3://bucket/images/a@2x.png not found", [], ["s3://bucket/images/a@2x.png not found"]),
    (
        "sha1 0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c",
        [],
        ["0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c"],
    ),
    ("NoSuchKey: images/AKIA.jpg", [], ["images/AKIA.jpg"]),
    ("user@example.com wrote", [], ["user@example.com wrote"]),
]


@pytest.mark.parametrize(("message", "gone", "kept"), PATTERN_CASES)
def test_patterns(message, gone, kept):
    out = redact(message, environ={})
    for secret in gone:
        assert secret not in out, out
    for text in kept:
        assert text in out, out
    assert (MASK in out) == bool(gone)


def test_environment_values_are_masked_in_any_shape(canary_env):
    message = (
        f"creds {SECRET} / {TOKEN} / {KEY_ID} in a url "
        f"https://h/x?k={SECRET.replace('/', '%2F').replace('+', '%2B')} "
        f"pw=hunter2-canary-pw and ghp_canary0123456789 and abc and /var/run/secrets/token"
    )
    out = redact(message)
    for canary in (
        SECRET,
        TOKEN,
        KEY_ID,
        "hunter2-canary-pw",
        "ghp_canary0123456789",
        "zCanarySecret",
    ):
        assert canary not in out, out
    # Short values and location-valued variables are not masked (they would mask words/paths).
    assert " abc " in out and "/var/run/secrets/token" in out
    assert SECRET in secret_env_values() and "abc" not in secret_env_values()
    assert secret_env_values() == sorted(secret_env_values(), key=len, reverse=True)


def test_env_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv("LATE_API_KEY", "late-canary-value")
    assert redact("x late-canary-value y") == f"x {MASK} y"
    monkeypatch.delenv("LATE_API_KEY")
    assert redact("x late-canary-value y") == "x late-canary-value y"


def test_describe_error_redacts_and_bounds(canary_env):
    exc = PermissionError(f"denied for {KEY_ID}:{SECRET} " + "x" * 5000)
    text = describe_error(exc, max_chars=300)
    assert text.startswith("PermissionError: denied for ")
    assert KEY_ID not in text and SECRET not in text
    assert len(text) == 300 and text.endswith("...[truncated]")
    assert redact(ValueError("AKIAIOSFODNN7EXAMPLE")) == MASK  # non-str input is str()-ed


def test_real_botocore_debug_log_leaks_without_filter_and_not_with_it(canary_env):
    """Real requests from botocore with canary credentials: its DEBUG log carries them."""
    with moto_s3(set_env=False) as s3:
        s3.create_bucket("canary-bucket")
        c = boto3.client(
            "s3",
            endpoint_url=s3.endpoint_url,
            config=Config(retries={"total_max_attempts": 1}),
        )  # credentials from the canary environment, as on a cluster
        presigned = c.generate_presigned_url(
            "get_object", Params={"Bucket": "canary-bucket", "Key": "k"}
        )

        def run(with_filter: bool) -> str:
            stream = io.StringIO()
            handler = logging.StreamHandler(stream)
            if with_filter:
                handler.addFilter(RedactingFilter())
            log = logging.getLogger("botocore")
            old_level = log.level
            log.setLevel(logging.DEBUG)
            log.addHandler(handler)
            try:
                with pytest.raises(botocore.exceptions.ClientError) as err:
                    c.get_object(Bucket="canary-bucket", Key="missing.jpg")
                logging.getLogger("botocore.test").error(
                    "fetch failed for %s", presigned, exc_info=err.value
                )
            finally:
                log.removeHandler(handler)
                log.setLevel(old_level)
            return stream.getvalue()

        leaked = run(with_filter=False)
        clean = run(with_filter=True)

    # Without the filter, the log really carries the canaries (so this test can fail)...
    assert KEY_ID in leaked and TOKEN in leaked
    # ...with it, none of them, while the log is still useful.
    for canary in (KEY_ID, SECRET, TOKEN, "zCanarySecret"):
        assert canary not in clean
    assert "missing.jpg" in clean and "NoSuchKey" in clean and MASK in clean
    assert KEY_ID not in redact(presigned) and TOKEN not in redact(presigned)
