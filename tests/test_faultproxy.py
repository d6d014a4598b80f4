"""Tests for the fault-injecting proxy (tests/support/faultproxy.py) in front of a real moto server.

python -m pytest tests/test_faultproxy.py -q
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import botocore.exceptions
import pytest

from tests.support.faultproxy import FaultProxy, Faults
from tests.support.s3 import (
    MotoS3,
    aws_env,
    client,
    moto_s3,
    pyarrow_filesystem,
    s3fs_filesystem,
)


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3]:
    with moto_s3() as server:
        yield server


@pytest.fixture
def bucket(s3: MotoS3) -> Iterator[str]:
    s3.reset()
    s3.create_bucket("faults")
    yield "faults"


class _Echo(BaseHTTPRequestHandler):
    """Upstream that answers with what it received, so header/body forwarding can be checked."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append((self.command, self.path, dict(self.headers.items()), body))
        out = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": dict(self.headers.items()),
                "body_sha": hashlib.sha256(body).hexdigest(),
                "body_len": len(body),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Upstream", "echo")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer


@pytest.fixture
def echo() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    server.block_on_close = False
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _echo_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


def _hostport(proxy: FaultProxy) -> tuple[str, int]:
    host, port = proxy.url.removeprefix("http://").split(":")
    return host, int(port)


def test_forwards_headers_host_query_and_chunked_body_unchanged(echo):
    body = bytes(range(256)) * 300
    with FaultProxy(_echo_url(echo)) as proxy:
        conn = http.client.HTTPConnection(*_hostport(proxy), timeout=5)
        # A chunked upload (what streaming clients send), several chunks of odd sizes.
        conn.putrequest("PUT", "/bkt/some%20key?partNumber=2&uploadId=abc")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.putheader("X-Amz-Meta-Colour", "blue")
        conn.putheader("Authorization", "AWS4-HMAC-SHA256 Credential=x/y, Signature=z")
        conn.endheaders()
        for start in range(0, len(body), 7001):
            chunk = body[start : start + 7001]
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        got = json.loads(resp.read())
        assert resp.status == 200
        assert resp.getheader("X-Upstream") == "echo"
        # Same connection again (keep-alive), a HEAD: headers come back, no body.
        conn.request("HEAD", "/bkt/other")
        head = conn.getresponse()
        assert head.status == 200 and head.read() == b""
        assert int(head.getheader("Content-Length")) > 0
        conn.close()

    assert got["method"] == "PUT"
    assert got["path"] == "/bkt/some%20key?partNumber=2&uploadId=abc"
    assert got["body_len"] == len(body)
    assert got["body_sha"] == hashlib.sha256(body).hexdigest()
    headers = {k.lower(): v for k, v in got["headers"].items()}
    assert headers["host"] == proxy.url.removeprefix("http://")  # Host forwarded unchanged
    assert headers["x-amz-meta-colour"] == "blue"
    assert headers["authorization"].startswith("AWS4-HMAC-SHA256")
    assert "transfer-encoding" not in headers and headers["content-length"] == str(len(body))
    assert [(r.method, r.path, r.query) for r in proxy.requests()] == [
        ("PUT", "/bkt/some key", "partNumber=2&uploadId=abc"),
        ("HEAD", "/bkt/other", ""),
    ]
    assert proxy.stats().forwarded == 2


def test_reset_sends_rst_and_forwards_nothing(echo):
    with FaultProxy(_echo_url(echo), Faults(reset_every=1)) as proxy:
        sock = socket.create_connection(_hostport(proxy), timeout=5)
        sock.sendall(b"GET /bkt/key HTTP/1.1\r\nHost: x\r\n\r\n")
        # An RST (not a FIN, which would read as b""): the client sees a reset.
        with pytest.raises(ConnectionResetError):
            sock.recv(1024)
        sock.close()
    assert echo.seen == []
    stats = proxy.stats()
    assert (stats.requests, stats.resets, stats.forwarded) == (1, 1, 0)
    assert proxy.requests()[0].status is None and proxy.requests()[0].fault == "reset"


def test_reset_after_forwards_then_drops_the_answer(echo):
    with FaultProxy(_echo_url(echo), Faults(reset_after_every=1)) as proxy:
        conn = http.client.HTTPConnection(*_hostport(proxy), timeout=5)
        conn.request("PUT", "/bkt/written", body=b"payload")
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            conn.getresponse()
    assert [(m, p, b) for m, p, _, b in echo.seen] == [("PUT", "/bkt/written", b"payload")]
    assert (proxy.stats().resets_after, proxy.stats().forwarded) == (1, 1)


def test_slowdown_is_a_real_s3_error(s3, bucket):
    s3.put_bytes(bucket, "k", b"v")
    with FaultProxy(s3.endpoint_url, Faults(slowdown_every=1)) as proxy:
        c = client(proxy.url, retries={"total_max_attempts": 1})
        with pytest.raises(botocore.exceptions.ClientError) as err:
            c.get_object(Bucket=bucket, Key="k")
    assert err.value.response["Error"]["Code"] == "SlowDown"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert (proxy.stats().slowdowns, proxy.stats().forwarded) == (1, 0)


def test_same_seed_same_faults_and_filter_limits_them(echo):
    def run(seed: int) -> list[str | None]:
        faults = Faults(slowdown=0.3, reset=0.1, methods={"GET"}, path_prefix="/bkt/images/")
        with FaultProxy(_echo_url(echo), faults, seed=seed) as proxy:
            for i in range(60):
                method, path = ("GET", f"/bkt/images/{i}") if i % 3 else ("PUT", f"/bkt/out/{i}")
                conn = http.client.HTTPConnection(*_hostport(proxy), timeout=5)
                try:
                    conn.request(method, path, body=b"x" if method == "PUT" else None)
                    conn.getresponse().read()
                except ConnectionError:
                    pass
                finally:
                    conn.close()
            log = proxy.requests()
        assert all(r.fault is None for r in log if r.method == "PUT")
        assert all(r.status == 200 for r in log if r.fault is None)
        return [r.fault for r in log]

    first, again, other = run(11), run(11), run(12)
    assert first == again
    assert first != other
    assert {"slowdown", "reset"} <= set(first)


def test_every_nth_delay_and_max_faults(echo):
    faults = Faults(slowdown_every=2, max_faults=2, delay_every=3, delay_s=0.5)
    with FaultProxy(_echo_url(echo), faults) as proxy:
        statuses, durations = [], []
        for i in range(6):
            conn = http.client.HTTPConnection(*_hostport(proxy), timeout=5)
            t0 = time.monotonic()
            conn.request("GET", f"/k{i}")
            statuses.append(conn.getresponse().status)
            durations.append(time.monotonic() - t0)
            conn.close()
    # 2nd and 4th are 503; the 6th would be too but max_faults=2 stops it.
    assert statuses == [200, 503, 200, 503, 200, 200]
    # The 3rd and 6th are delayed (a 503 is answered at once, so only forwarded ones sleep).
    assert durations[2] >= 0.5 and durations[5] >= 0.5
    assert max(durations[i] for i in (0, 1, 3, 4)) < 0.5
    assert proxy.stats().delays == 2


def test_upstream_down_answers_502(echo):
    url = _echo_url(echo)
    echo.shutdown()
    echo.server_close()
    with FaultProxy(url, upstream_timeout=2) as proxy:
        conn = http.client.HTTPConnection(*_hostport(proxy), timeout=5)
        conn.request("GET", "/x")
        assert conn.getresponse().status == 502
    assert proxy.stats().upstream_errors == 1


@pytest.mark.slow  # about 10 s: botocore backs off up to 1 s after each 503
def test_s3fs_survives_503s_and_resets(s3, bucket):
    """50 objects written and read back through 10% 503s plus resets: nothing lost."""
    faults = Faults(slowdown=0.10, reset=0.03, reset_after=0.02)
    with FaultProxy(s3.endpoint_url, faults, seed=4) as proxy:
        fs = s3fs_filesystem(proxy.url)
        payloads = {
            f"{bucket}/obj/{i:03d}.bin": hashlib.sha256(b"%d" % i).digest() * (i + 1)
            for i in range(50)
        }
        for path, data in payloads.items():
            fs.pipe(path, data)
        listed = sorted(fs.find(f"{bucket}/obj/"))
        read = {path: fs.cat(path) for path in payloads}
        stats = proxy.stats()

    assert listed == sorted(payloads)
    assert read == payloads
    assert s3.count_objects(bucket, "obj/") == 50  # checked straight on moto, not through the proxy
    assert stats.slowdowns >= 3 and stats.resets >= 1, stats
    assert stats.requests == stats.forwarded + stats.slowdowns + stats.resets
    assert proxy.count(method="PUT", prefix=f"/{bucket}/obj/") >= 50
    assert proxy.count(path=f"/{bucket}/obj/never-written.bin") == 0


def test_all_connections_reset_fails_fast_with_a_clear_error(s3, bucket):
    s3.put_bytes(bucket, "k.bin", b"v")
    with FaultProxy(s3.endpoint_url, Faults(reset_every=1)) as proxy:
        fs = s3fs_filesystem(proxy.url, config_kwargs={"retries": {"total_max_attempts": 2}})
        fs.retries = 2
        t0 = time.monotonic()
        with pytest.raises(botocore.exceptions.EndpointConnectionError, match=r"k\.bin"):
            fs.cat(f"{bucket}/k.bin")
        elapsed = time.monotonic() - t0
    assert elapsed < 10, elapsed
    assert proxy.stats().resets >= 2 and proxy.stats().forwarded == 0


def test_multipart_ranged_get_head_and_listing_pass_through(s3, bucket):
    """The S3 calls the pipeline makes, byte-exact through the proxy, with faults on."""
    part = 5 * 2**20  # S3's minimum part size
    blob = hashlib.sha256(b"seed").digest() * (part // 32) + b"tail"
    with FaultProxy(s3.endpoint_url, Faults(slowdown_every=7), seed=1) as proxy:
        fs = s3fs_filesystem(proxy.url)
        with fs.open(f"{bucket}/big.bin", "wb", block_size=part) as f:
            f.write(blob)
            f.write(blob)
        info = fs.info(f"{bucket}/big.bin")
        with fs.open(f"{bucket}/big.bin", "rb", block_size=2**16, cache_type="none") as f:
            f.seek(part + 100)
            middle = f.read(1000)
        listed = fs.ls(bucket)
        log = proxy.requests()

    assert info["size"] == 2 * len(blob)
    assert middle == (blob + blob)[part + 100 : part + 1100]
    assert s3.get_bytes(bucket, "big.bin") == blob + blob
    assert listed == [f"{bucket}/big.bin"]
    seen = {(r.method, r.query.split("=")[0], r.status) for r in log}
    assert ("POST", "uploads", 200) in seen  # CreateMultipartUpload
    assert ("PUT", "partNumber", 200) in seen  # UploadPart
    assert ("POST", "uploadId", 200) in seen  # CompleteMultipartUpload
    assert ("GET", "", 206) in seen  # ranged GET
    assert any(r.method == "HEAD" and r.status == 200 for r in log)
    assert any(r.method == "GET" and "list-type=2" in r.query for r in log)  # ListObjectsV2
    assert proxy.stats().slowdowns >= 1


def test_pyarrow_parquet_through_503s(s3, bucket):
    """pyarrow's own S3 client (what Ray's Parquet I/O uses) retries the injected 503s."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(20_000)), "text": ["hello"] * 20_000})
    with FaultProxy(s3.endpoint_url, Faults(slowdown_every=3), seed=2) as proxy:
        fs = pyarrow_filesystem(proxy.url)
        pq.write_table(table, f"{bucket}/t.parquet", filesystem=fs)
        back = pq.read_table(f"{bucket}/t.parquet", filesystem=fs)
    assert back.equals(table)
    assert proxy.stats().slowdowns >= 2


def test_aws_env_sets_dummies_and_restores(monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "someone-elses")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "before")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with aws_env("http://127.0.0.1:1") as env:
        assert os.environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1"
        assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true"
        assert os.environ["AWS_ACCESS_KEY_ID"] == env["AWS_ACCESS_KEY_ID"] != "before"
        assert "AWS_PROFILE" not in os.environ
    assert os.environ["AWS_PROFILE"] == "someone-elses"
    assert os.environ["AWS_ACCESS_KEY_ID"] == "before"
    assert "AWS_ENDPOINT_URL" not in os.environ
