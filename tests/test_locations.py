"""Tests for pipeline/guards/locations.py: the allowed-locations policy and the checked http fetch.

python -m pytest tests/test_locations.py -q
"""

from __future__ import annotations

import os
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.guards.locations import (
    FetchError,
    LocationPolicy,
    ResponseTooLarge,
    UnsafeLocation,
    resolve_host,
    safe_http_get,
)

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"
DNS = {
    "images.example.com": [PUBLIC_V4],
    "v6.example.com": [PUBLIC_V6],
    "xn--bcher-kva.example": [PUBLIC_V4],  # bücher.example
    "localhost": ["127.0.0.1", "::1"],
    "internal.example.com": ["10.0.0.5"],
    "mixed.example.com": [PUBLIC_V4, "192.168.1.1"],
    "metadata.google.internal": ["169.254.169.254"],
    "cgnat.example.com": ["100.64.0.7"],
    "mapped.example.com": ["::ffff:169.254.169.254"],
}


class FakeDNS:
    """A resolver with fixed answers that records what it was asked."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = answers
        self.asked: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.answers[host]


def make_policy(**kw) -> LocationPolicy:
    base = dict(
        allowed=["s3://bkt/images/", "gs://gbkt", "/data/images/"],
        allow_local=True,
        allow_http=True,
        max_key_length=64,
        resolver=FakeDNS(DNS),
    )
    return LocationPolicy(**{**base, **kw})


ALLOWED = [
    "s3://bkt/images/a.jpg",
    "S3://bkt/images/a.jpg",  # schemes are case-insensitive
    "s3a://bkt/images/a.jpg",
    "s3://bkt/images/sub/dir/with space.jpg",
    "s3://bkt/images/%20x.jpg",  # encoded space is an ordinary character
    "s3://bkt/images/猫.jpg",
    "s3://bkt/images/می\u200cخواهم.jpg",  # Persian: ZWNJ is part of the spelling
    "s3://bkt/images/a..b.jpg",  # dots inside a name are not traversal
    "s3://bkt/images/.hidden.jpg",
    "gs://gbkt/x.png",
    "gcs://gbkt/deep/x.png",
    "/data/images/a.jpg",
    "file:///data/images/a.jpg",
    "file://localhost/data/images/a.jpg",
    "https://images.example.com/a.jpg",
    "https://images.example.com/a.jpg?X-Amz-Signature=abc&w=1",
    "http://images.example.com:8080/a.jpg",
    "https://IMAGES.example.com./a.jpg",  # case and trailing dot
    "https://bücher.example/a.jpg",  # IDN, resolved as its punycode
    f"http://{PUBLIC_V4}/a.jpg",
    f"https://[{PUBLIC_V6}]/a.jpg",
    "https://v6.example.com/a.jpg",
    "https://images.example.com",  # no path at all
    "s3://bkt/images/" + "a" * 57,  # key of exactly max_key_length (64) bytes
]

# (uri, substring of the reason)
REFUSED = [
    # not a usable string
    (None, "not a string"),
    (123, "not a string"),
    ("", "empty"),
    (" s3://bkt/images/a.jpg", "whitespace"),
    ("s3://bkt/images/a.jpg\n", "whitespace"),
    # local paths
    ("/etc/passwd", "outside the allowed directories"),
    ("file:///etc/passwd", "outside the allowed directories"),
    ("/data/images-old/a.jpg", "outside the allowed directories"),
    ("/data/images", "outside the allowed directories"),
    ("images/a.jpg", "relative"),
    ("./a.jpg", "relative"),
    ("../a.jpg", "relative"),
    ("~/a.jpg", "relative"),
    ("/data/images/../../etc/passwd", "'..' segment"),
    ("/data/images/./a.jpg", "'.' segment"),
    ("file://evil.example/data/images/a.jpg", "naming a host"),
    ("file:/data/images/a.jpg", "malformed file URI"),
    ("C:/data/images/a.jpg", "Windows drive"),
    ("C:\\data\\images\\a.jpg", "backslash"),
    # other buckets and prefixes
    ("s3://other/images/a.jpg", "outside the allowed locations"),
    ("s3://bkt/other/a.jpg", "outside the allowed locations"),
    ("s3://bkt/images-old/a.jpg", "outside the allowed locations"),
    ("s3://bkt/images", "outside the allowed locations"),
    ("s3://bkt/", "no object key"),
    ("s3:///images/a.jpg", "invalid bucket"),
    ("s3://user@bkt/images/a.jpg", "invalid bucket"),
    ("s3://bkt:443/images/a.jpg", "invalid bucket"),
    ("s3://BKT/images/a.jpg", "invalid bucket"),
    ("s3:bkt/images/a.jpg", "malformed URI"),
    # traversal, plain and encoded
    ("s3://bkt/images/../secret/a.jpg", "'..' segment"),
    ("s3://bkt/images/./a.jpg", "'.' segment"),
    ("s3://bkt/images/sub/..", "'..' segment"),
    ("s3://bkt/images//a.jpg", "empty segment"),
    ("s3://bkt/images/dir/", "empty segment"),
    ("s3://bkt/images/%2e%2e/secret/a.jpg", "encoded '..' segment"),
    ("s3://bkt/images/%2E%2E/secret", "encoded '..' segment"),
    ("s3://bkt/images/.%2e/secret", "encoded '..' segment"),
    ("s3://bkt/images/%252e%252e/secret", "encoded '..' segment"),  # double-encoded
    ("s3://bkt/images/%25252e%25252e/x", "encoded '..' segment"),  # triple-encoded
    ("s3://bkt/images/%2525252e%2525252e/x", "too many levels"),
    ("s3://bkt/images/..%2fsecret", "encoded '/'"),
    ("s3://bkt/images/a%2Fb.jpg", "encoded '/'"),
    ("s3://bkt/images/a%252fb.jpg", "encoded '/'"),
    ("s3://bkt/images/a%5cb.jpg", "encoded backslash"),
    ("s3://bkt/images/a\\..\\b.jpg", "backslash"),
    ("s3://bkt/images/a%00.jpg", "encoded control character U+0000"),
    ("s3://bkt/images/a%0a.jpg", "encoded control character U+000A"),
    ("s3://bkt/images/\uff0e\uff0e/secret", "encoded '..' segment"),  # full-width dots
    ("s3://bkt/images/\u2025/secret", "encoded '..' segment"),  # two-dot leader
    ("s3://bkt/images/a\uff0fb.jpg", "encoded '/'"),  # full-width solidus
    # control and invisible characters
    ("s3://bkt/images/a\x00.jpg", "control character U+0000"),
    ("s3://bkt/images/a\x1b.jpg", "control character U+001B"),
    ("s3://bkt/images/a\x7f.jpg", "control character U+007F"),
    ("s3://bkt/images/a\u0085.jpg", "control character U+0085"),
    ("s3://bkt/images/a\u202egpj.exe", "control character U+202E"),
    ("s3://bkt/images/a\u202d.jpg", "control character U+202D"),
    ("s3://bkt/images/\ufeffa.jpg", "control character U+FEFF"),
    ("s3://bkt/images/a\u2028.jpg", "control character U+2028"),
    ("s3://bkt/images/a\ud800.jpg", "control character U+D800"),
    # length (max_key_length=64 bytes of UTF-8)
    ("s3://bkt/images/" + "a" * 58, "object key too long (65 bytes > 64)"),
    ("s3://bkt/images/" + "é" * 30, "object key too long (67 bytes > 64)"),
    ("/data/images/" + "a" * 60, "local path too long (73 bytes > 64)"),
    ("https://images.example.com/" + "a" * 70, "URL path too long"),
    ("https://images.example.com/a?" + "q" * 9000, "URL too long"),
    # unknown schemes
    ("ftp://bkt/images/a.jpg", "scheme 'ftp' is not allowed"),
    ("hdfs://nn/images/a.jpg", "scheme 'hdfs' is not allowed"),
    ("az://bkt/images/a.jpg", "scheme 'az' is not allowed"),
    ("data:image/png;base64,iVBORw0KGgo=", "scheme 'data' is not allowed"),
    ("javascript:alert(1)", "scheme 'javascript' is not allowed"),
    # http(s): addresses that must never be reached
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://metadata.google.internal/computeMetadata/v1/", "resolves to 169.254.169.254"),
    ("http://127.0.0.1/", "loopback"),
    ("http://127.0.0.1:9000/a.jpg", "loopback"),
    ("http://localhost/a.jpg", "resolves to 127.0.0.1, which is loopback"),
    ("http://2130706433/", "address 127.0.0.1, which is loopback"),  # decimal
    ("http://0x7f000001/", "address 127.0.0.1, which is loopback"),  # hex
    ("http://0x7f.1/", "address 127.0.0.1, which is loopback"),  # short hex form
    ("http://0177.0.0.1/", "address 127.0.0.1, which is loopback"),  # octal
    ("http://017700000001/", "address 127.0.0.1, which is loopback"),  # octal whole
    ("http://127.1/", "address 127.0.0.1, which is loopback"),
    ("http://127.000.000.001/", "address 127.0.0.1, which is loopback"),
    ("http://0/", "unspecified"),
    ("http://0.0.0.0:8265/", "unspecified"),  # the Ray dashboard on any interface
    ("http://[::]/", "unspecified"),
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback (embeds 127.0.0.1)"),
    ("http://[::ffff:a9fe:a9fe]/", "link-local (embeds 169.254.169.254)"),
    ("http://[::127.0.0.1]/", "loopback (embeds 127.0.0.1)"),
    ("http://[64:ff9b::a9fe:a9fe]/", "link-local (embeds 169.254.169.254)"),  # NAT64
    ("http://[2002:7f00:1::]/", "loopback (embeds 127.0.0.1)"),  # 6to4
    ("http://[fe80::1]/", "link-local"),
    ("http://[fe80::1%25eth0]/", "zone id"),
    ("http://[fc00::1]/", "private"),
    ("http://[fd12:3456::1]/", "private"),
    ("http://[ff02::1]/", "multicast"),
    ("http://10.1.2.3/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://172.31.255.255/", "private"),
    ("http://192.168.0.1/", "private"),
    ("http://100.64.0.1/", "non-public"),  # carrier-grade NAT
    ("http://cgnat.example.com/", "non-public"),
    ("http://224.0.0.1/", "multicast"),
    ("http://255.255.255.255/", "private"),
    ("http://internal.example.com/a.jpg", "resolves to 10.0.0.5, which is private"),
    ("http://mixed.example.com/a.jpg", "resolves to 192.168.1.1, which is private"),
    ("http://mapped.example.com/a.jpg", "link-local (embeds 169.254.169.254)"),
    ("http://nosuchhost.invalid/a.jpg", "cannot resolve host"),
    ("http://256.1.1.1/", "malformed numeric host"),
    ("http://1.2.3.4.5/", "malformed numeric host"),
    ("http://example.123/", "malformed numeric host"),
    ("http://09.1.1.1/", "malformed numeric host"),
    ("http://bad_host!.example/", "invalid host name"),
    ("http://a..b.example/", "invalid host name"),
    ("http://user:pw@images.example.com/a.jpg", "credentials in URLs"),
    ("http://images.example.com@127.0.0.1/", "credentials in URLs"),
    ("http:///a.jpg", "no host"),
    ("http://images.example.com:99999/", "malformed URL"),
    ("https://images.example.com/a/../../admin", "'..' segment"),
    ("https://images.example.com/%2e%2e/admin", "encoded '..' segment"),
]


@pytest.mark.parametrize("uri", ALLOWED)
def test_allowed(uri):
    assert make_policy().check(uri) is None


@pytest.mark.parametrize(("uri", "reason"), REFUSED)
def test_refused(uri, reason):
    got = make_policy().check(uri)
    assert got is not None, f"{uri!r} was allowed"
    assert reason in got, got


def test_switches_off_by_default():
    policy = LocationPolicy(allowed=["s3://bkt/images/", "/data/images/"], resolver=FakeDNS(DNS))
    assert policy.check("s3://bkt/images/a.jpg") is None
    assert "allow_local is off" in policy.check("/data/images/a.jpg")
    assert "allow_local is off" in policy.check("file:///data/images/a.jpg")
    assert "allow_http is off" in policy.check("https://images.example.com/a.jpg")
    assert "scheme 'gs' is not allowed" in policy.check("gs://gbkt/a.jpg")
    assert "scheme 's3' is not allowed" in LocationPolicy().check("s3://bkt/images/a.jpg")


def test_http_prefixes_restrict_http_urls():
    policy = make_policy(allowed=["https://Images.Example.com/public/"])
    assert policy.check("https://images.example.com/public/a.jpg") is None
    assert "outside the allowed" in policy.check("https://images.example.com/private/a.jpg")
    assert "outside the allowed" in policy.check("http://images.example.com/public/a.jpg")
    assert "outside the allowed" in policy.check("https://v6.example.com/public/a.jpg")


def test_allowed_networks_open_only_what_they_name():
    policy = make_policy(allowed_networks=["10.0.0.0/24"])
    assert policy.check("http://internal.example.com/a.jpg") is None
    assert policy.check("http://10.0.0.200/a.jpg") is None
    assert "private" in policy.check("http://10.0.1.1/a.jpg")
    assert "link-local" in policy.check("http://169.254.169.254/")


def test_no_request_is_made_and_dns_only_for_http_names(monkeypatch):
    """The policy never opens a socket; it asks the resolver only about http host names."""
    opened: list[object] = []

    def spy(*args, **kwargs):
        opened.append(args)
        raise AssertionError("the policy opened a connection")

    monkeypatch.setattr(socket, "create_connection", spy)
    monkeypatch.setattr(socket.socket, "connect", spy)
    dns = FakeDNS(DNS)
    policy = make_policy(resolver=dns)
    for uri in ALLOWED + [u for u, _ in REFUSED]:
        policy.check(uri)
    assert opened == []
    names = {h for h in dns.asked}
    assert names <= set(DNS) | {"nosuchhost.invalid"}
    # IP literals in any spelling are never sent to DNS.
    assert not any(h[0].isdigit() or ":" in h for h in names)


def test_default_resolver_refuses_localhost_and_is_picklable():
    policy = LocationPolicy(allowed=["s3://bkt/"], allow_http=True)
    assert "loopback" in policy.check("http://localhost/a.jpg")
    assert "127.0.0.1" in resolve_host("localhost", 80)
    again = pickle.loads(pickle.dumps(policy))  # the policy travels to Ray workers
    assert again == policy and again.check("s3://bkt/a.jpg") is None


def test_symlink_out_of_an_allowed_directory_is_refused(tmp_path):
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "ok.jpg").write_bytes(b"x")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.pem").write_bytes(b"x")
    os.symlink(secret, allowed / "link")
    policy = LocationPolicy(allowed=[str(allowed)], allow_local=True)
    assert policy.check(str(allowed / "ok.jpg")) is None
    assert policy.check(f"file://{allowed}/ok.jpg") is None
    assert "through a link" in policy.check(str(allowed / "link" / "key.pem"))
    assert "outside the allowed directories" in policy.check(str(secret / "key.pem"))


def test_bad_allowed_prefixes_fail_loudly():
    with pytest.raises(AssertionError, match="absolute"):
        LocationPolicy(allowed=["data/images/"])
    with pytest.raises(AssertionError, match="non-empty"):
        LocationPolicy(allowed=[""])


# -- safe_http_get against a real server on 127.0.0.1 ------------------------------------------
class _Site(BaseHTTPRequestHandler):
    """Routes: /img (the image), /big, /chunked-big, /slow, /missing, /to?url=..., /loop."""

    protocol_version = "HTTP/1.1"
    image = bytes(range(256)) * 40

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits.append((self.path, self.headers.get("Host")))
        path, _, query = self.path.partition("?")
        if path in ("/img", "/%E7%8C%AB%20x.jpg"):
            self._reply(200, self.image)
        elif path == "/big":
            self._reply(200, b"x" * 5000)
        elif path == "/chunked-big":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"3e8\r\n" + b"y" * 1000 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):  # one byte every 0.1 s: each read is quick, the whole is not
                self.wfile.write(b"z")
                self.wfile.flush()
                time.sleep(0.1)
        elif path == "/to":
            self.send_response(302)
            self.send_header("Location", query.removeprefix("url="))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/loop":
            self.send_response(301)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._reply(404, b"no")

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def site() -> Iterator[tuple[ThreadingHTTPServer, int]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Site)
    server.daemon_threads = True
    server.block_on_close = False
    server.hits = []
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server, server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def connections(monkeypatch) -> list[tuple[str, int]]:
    """Every address a socket connects to during the test."""
    seen: list[tuple[str, int]] = []
    real = socket.create_connection

    def spy(address, *args, **kwargs):
        seen.append(tuple(address[:2]))
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", spy)
    return seen


def site_policy(dns: FakeDNS | None = None) -> LocationPolicy:
    # images.test resolves to the local server, trusted through allowed_networks; every other
    # loopback / private address stays refused.
    return LocationPolicy(
        allow_http=True,
        allowed_networks=["127.0.0.1/32"],
        resolver=dns or FakeDNS({"images.test": ["127.0.0.1"], **DNS}),
    )


def test_fetch_sends_the_name_but_connects_to_the_checked_address(site, connections):
    server, port = site
    data = safe_http_get(f"http://images.test:{port}/img", site_policy(), max_bytes=1 << 20)
    assert data == _Site.image
    assert server.hits == [("/img", f"images.test:{port}")]
    assert connections == [("127.0.0.1", port)]


def test_non_ascii_and_spaces_are_encoded_in_the_request_line(site):
    server, port = site
    assert safe_http_get(f"http://images.test:{port}/猫 x.jpg", site_policy(), 1 << 20)
    assert safe_http_get(f"http://images.test:{port}/%E7%8C%AB%20x.jpg", site_policy(), 1 << 20)
    assert [p for p, _ in server.hits] == ["/%E7%8C%AB%20x.jpg"] * 2


def test_dns_is_not_asked_for_urls_outside_the_http_prefixes():
    dns = FakeDNS(DNS)
    policy = make_policy(allowed=["https://images.example.com/public/"], resolver=dns)
    assert "outside the allowed" in policy.check("https://v6.example.com/x.jpg")
    assert dns.asked == []


def test_redirects_are_followed_and_each_hop_is_checked(site, connections):
    server, port = site
    url = f"http://images.test:{port}/to?url=/img"
    assert safe_http_get(url, site_policy(), max_bytes=1 << 20) == _Site.image
    assert [p for p, _ in server.hits] == ["/to?url=/img", "/img"]

    for target, reason in [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        (f"http://[::1]:{port}/img", "loopback"),
        (f"http://localhost:{port}/img", "resolves to ::1, which is loopback"),
        ("http://internal.example.com/img", "private"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("s3://bkt/images/a.jpg", "scheme 's3'"),
    ]:
        server.hits.clear()
        connections.clear()
        with pytest.raises(UnsafeLocation, match=reason.replace("(", r"\(")):
            safe_http_get(f"http://images.test:{port}/to?url={target}", site_policy(), 1 << 20)
        # Only the first hop, to the trusted server, was ever connected to.
        assert connections == [("127.0.0.1", port)], target
        assert len(server.hits) == 1


def test_dns_rebinding_cannot_switch_the_address(site, connections):
    """The name is resolved once per hop and the connection goes to that checked address."""
    _, port = site

    class Rebinding(FakeDNS):
        def __call__(self, host: str, port: int) -> list[str]:
            self.asked.append(host)
            return ["127.0.0.1"] if len(self.asked) == 1 else ["169.254.169.254"]

    dns = Rebinding({})
    assert safe_http_get(f"http://rebind.test:{port}/img", site_policy(dns), 1 << 20)
    assert dns.asked == ["rebind.test"]
    assert connections == [("127.0.0.1", port)]
    # A second fetch sees the new answer and is refused before connecting.
    connections.clear()
    with pytest.raises(UnsafeLocation, match="link-local"):
        safe_http_get(f"http://rebind.test:{port}/img", site_policy(dns), 1 << 20)
    assert connections == []


def test_size_limits(site):
    _, port = site
    with pytest.raises(ResponseTooLarge, match="5000 bytes > limit 4096"):
        safe_http_get(f"http://images.test:{port}/big", site_policy(), max_bytes=4096)
    with pytest.raises(ResponseTooLarge, match="exceeds limit 4096"):
        safe_http_get(f"http://images.test:{port}/chunked-big", site_policy(), max_bytes=4096)
    body = safe_http_get(f"http://images.test:{port}/chunked-big", site_policy(), 20_000)
    assert body == b"y" * 10_000


def test_failures_are_fetch_errors(site):
    _, port = site
    with pytest.raises(FetchError, match="HTTP 404"):
        safe_http_get(f"http://images.test:{port}/missing", site_policy(), 1 << 20)
    with pytest.raises(FetchError, match="more than 3 redirects"):
        safe_http_get(f"http://images.test:{port}/loop", site_policy(), 1 << 20, max_redirects=3)
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        safe_http_get(f"http://images.test:{port}/slow", site_policy(), 1 << 20, timeout=1.0)
    assert time.monotonic() - t0 < 3.0
    # Nothing listening: a connection error, not a hang.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    with pytest.raises(FetchError, match="ConnectionRefusedError"):
        safe_http_get(f"http://images.test:{free_port}/img", site_policy(), 1 << 20, timeout=2)
