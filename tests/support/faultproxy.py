"""A fault-injecting HTTP reverse proxy for object-storage tests (stdlib only).

moto has no fault injection, so tests put this proxy between the client (s3fs, botocore,
pyarrow, Ray) and a moto server on 127.0.0.1, and point the client's endpoint at `proxy.url`:

    with moto_s3() as s3, FaultProxy(s3.endpoint_url, Faults(slowdown=0.1), seed=7) as proxy:
        fs = s3fs_filesystem(proxy.url)
        ...
        assert proxy.stats().slowdowns > 0              # faults really happened
        assert proxy.count(path="/bkt/images/evil.jpg") == 0   # no request for that key

Faults, each by seeded probability or every Nth matching request:
- `slowdown`: answer `503 SlowDown` with S3's XML error body (never forwarded);
- `reset`: read the request, then reset the connection (RST, no response; never forwarded);
- `reset_after`: forward the request, then reset instead of answering (the write happened
  but the client cannot know: the case idempotent retries must survive);
- `delay`: sleep `delay_s` before forwarding.
Only requests that match the filter (`methods`, `path_prefix`, `match`) can get a fault; all
requests are counted and logged. The same seed gives the same faults for the same sequence of
requests; concurrent clients interleave differently from run to run, so assert on counts
("> 0", "== 0"), not on which request failed.

Logged paths are `/bucket/key`, percent-decoded: clients use path-style addressing for an IP
endpoint such as 127.0.0.1. The proxy can sit in front of moto for a whole test session with
no faults (`NO_FAULTS`), and a test turns faults on with `set_faults` and off again after;
Ray workers reach it over loopback like any endpoint.

Request bodies (Content-Length or chunked) are read whole and forwarded with a Content-Length;
responses are forwarded whole (test objects are small). The Host header is forwarded unchanged
so a SigV4 signature made for the proxy's address stays consistent (moto does not check it).
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# Hop-by-hop headers (RFC 9110 7.6.1) are about one connection and must not be forwarded;
# Expect is answered by this proxy itself (it sends the 100 Continue and reads the body).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)


@dataclass(frozen=True)
class Faults:
    """Which faults to inject, and on which requests.

    Probabilities are drawn from one seeded `random.Random` per request, in this order:
    reset, reset_after, slowdown (their sum must be <= 1); delay is an independent draw.
    `*_every = N` injects that fault on every Nth matching request instead (1 = all).
    """

    slowdown: float = 0.0  # probability of 503 SlowDown
    reset: float = 0.0  # probability of a reset before forwarding
    reset_after: float = 0.0  # probability of forwarding, then resetting instead of answering
    delay: float = 0.0  # probability of sleeping `delay_s` before forwarding
    delay_s: float = 0.2
    slowdown_every: int = 0
    reset_every: int = 0
    reset_after_every: int = 0
    delay_every: int = 0
    methods: frozenset[str] | None = None  # only these HTTP methods get faults (None = all)
    path_prefix: str | None = None  # only request paths starting with this (e.g. "/bkt/images/")
    match: Callable[[str, str], bool] | None = None  # extra filter: match(method, path)
    max_faults: int | None = None  # stop injecting after this many faults (not counting delays)

    def __post_init__(self) -> None:
        total = self.slowdown + self.reset + self.reset_after
        assert 0.0 <= total <= 1.0, f"fault probabilities must sum to <= 1, got {total}"
        assert 0.0 <= self.delay <= 1.0, f"delay probability must be in [0, 1], got {self.delay}"
        if self.methods is not None:
            object.__setattr__(self, "methods", frozenset(m.upper() for m in self.methods))

    def applies(self, method: str, path: str) -> bool:
        """Whether a request may get a fault under this filter."""
        if self.methods is not None and method not in self.methods:
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        return self.match is None or self.match(method, path)


NO_FAULTS = Faults()


@dataclass(frozen=True)
class Request:
    """One request as the proxy saw it: `path` is percent-decoded, without the query string."""

    method: str
    path: str
    query: str
    fault: str | None  # "slowdown", "reset", "reset_after" or None (delays are not faults)
    delayed: bool
    status: int | None  # status the client got (None when the connection was reset)


@dataclass
class Stats:
    """Counters (a snapshot: `FaultProxy.stats()` returns a copy)."""

    requests: int = 0  # every request the proxy read
    forwarded: int = 0  # requests sent on to the upstream server
    slowdowns: int = 0  # injected 503 SlowDown answers
    resets: int = 0  # connections reset before forwarding
    resets_after: int = 0  # connections reset after forwarding
    delays: int = 0  # requests slowed down
    upstream_errors: int = 0  # upstream unreachable or failed (answered 502)
    by_fault: dict[str, int] = field(default_factory=dict)

    @property
    def faults(self) -> int:
        """Injected failures the client saw (503s and resets)."""
        return self.slowdowns + self.resets + self.resets_after


class FaultProxy:
    """The proxy: listens on 127.0.0.1 (free port) in a background thread, forwards upstream."""

    def __init__(
        self,
        upstream_url: str,
        faults: Faults = NO_FAULTS,
        seed: int = 0,
        upstream_timeout: float = 30.0,
        idle_timeout: float = 30.0,
    ) -> None:
        parts = urlsplit(upstream_url)
        assert parts.scheme == "http" and parts.hostname, (
            f"need http://host:port, got {upstream_url}"
        )
        self.upstream = (parts.hostname, parts.port or 80)
        self.upstream_timeout = upstream_timeout
        self._faults = faults
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stats = Stats()
        self._log: list[Request] = []
        self._matching = 0  # requests that matched the filter (for *_every)
        self._injected = 0  # faults injected under the current Faults (for max_faults)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._server.idle_timeout = idle_timeout
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(0.05,),  # shutdown() waits up to one poll interval
            name="faultproxy",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control and inspection ------------------------------------------------------------
    def set_faults(self, faults: Faults, seed: int | None = None) -> None:
        """Change the faults (and optionally reseed) while running, e.g. after test set-up."""
        with self._lock:
            self._faults = faults
            self._matching = 0
            self._injected = 0
            if seed is not None:
                self._rng = random.Random(seed)

    def reset_counters(self) -> None:
        """Zero the counters and clear the request log."""
        with self._lock:
            self._stats = Stats()
            self._log = []

    def stats(self) -> Stats:
        with self._lock:
            s = self._stats
            return Stats(**{**s.__dict__, "by_fault": dict(s.by_fault)})

    def requests(self) -> list[Request]:
        """A copy of the request log, in arrival order."""
        with self._lock:
            return list(self._log)

    def count(
        self,
        method: str | None = None,
        path: str | None = None,
        prefix: str | None = None,
        contains: str | None = None,
    ) -> int:
        """How many logged requests match all the given conditions (paths are decoded)."""
        return sum(
            1
            for r in self.requests()
            if (method is None or r.method == method.upper())
            and (path is None or r.path == path)
            and (prefix is None or r.path.startswith(prefix))
            and (contains is None or contains in r.path or contains in unquote(r.query))
        )

    # -- used by the handler ---------------------------------------------------------------
    def _decide(self, method: str, path: str) -> tuple[str | None, bool, float]:
        """Pick this request's fault (or None) and whether to delay it; count it."""
        with self._lock:
            f = self._faults
            self._stats.requests += 1
            # Draw for every request, matching or not, so the random stream does not depend
            # on the filter: same seed, same requests -> same faults.
            u, v = self._rng.random(), self._rng.random()
            if not f.applies(method, path):
                return None, False, 0.0
            self._matching += 1
            n = self._matching
            fault: str | None = None
            if f.max_faults is None or self._injected < f.max_faults:
                if (f.reset_every and n % f.reset_every == 0) or u < f.reset:
                    fault = "reset"
                elif (f.reset_after_every and n % f.reset_after_every == 0) or (
                    u < f.reset + f.reset_after
                ):
                    fault = "reset_after"
                elif (f.slowdown_every and n % f.slowdown_every == 0) or (
                    u < f.reset + f.reset_after + f.slowdown
                ):
                    fault = "slowdown"
            delayed = bool((f.delay_every and n % f.delay_every == 0) or v < f.delay)
            if fault == "slowdown":
                self._stats.slowdowns += 1
            elif fault == "reset":
                self._stats.resets += 1
            elif fault == "reset_after":
                self._stats.resets_after += 1
            if fault:
                self._injected += 1
                self._stats.by_fault[fault] = self._stats.by_fault.get(fault, 0) + 1
            if delayed:
                self._stats.delays += 1
            return fault, delayed, f.delay_s

    def _record(self, req: Request, forwarded: bool, upstream_error: bool) -> None:
        with self._lock:
            self._log.append(req)
            self._stats.forwarded += int(forwarded)
            self._stats.upstream_errors += int(upstream_error)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Idle keep-alive connections would make server_close() wait for their threads.
    block_on_close = False
    proxy: FaultProxy
    idle_timeout: float


class _ResetConnection(Exception):
    """Raised inside the handler to drop the connection with a TCP RST."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    server: _Server

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout
        super().setup()

    def log_message(self, format: str, *args: object) -> None:
        pass  # tests read the request log instead of stderr

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # Trailer fields end with an empty line.
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)  # CRLF after each chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        raise _ResetConnection

    def _send(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response_only(status, reason)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self.wfile.flush()

    def _slowdown(self, path: str) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
            f"<Resource>{path}</Resource><RequestId>{request_id}</RequestId></Error>"
        ).encode()
        headers = [
            ("Content-Type", "application/xml"),
            ("Content-Length", str(len(body))),
            ("x-amz-request-id", request_id),
            ("Date", self.date_time_string()),
        ]
        self._send(503, "Slow Down", headers, body)

    def _handle(self) -> None:
        proxy = self.server.proxy
        method = self.command
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        body = self._read_body()
        fault, delayed, delay_s = proxy._decide(method, path)

        def record(
            status: int | None, forwarded: bool = False, upstream_error: bool = False
        ) -> None:
            # Logged before the client hears anything, so a test that asserts on the log
            # right after its request returns never races the handler thread.
            req = Request(method, path, parts.query, fault, delayed, status)
            proxy._record(req, forwarded, upstream_error)

        if fault == "reset":
            record(None)
            self._reset()
        if fault == "slowdown":
            record(503)
            self._slowdown(path)
            return
        if delayed:
            time.sleep(delay_s)
        status, reason, headers, data, upstream_error = self._forward(method, body)
        if fault == "reset_after":
            record(None, forwarded=not upstream_error, upstream_error=upstream_error)
            self._reset()
        record(status, forwarded=not upstream_error, upstream_error=upstream_error)
        self._send(status, reason, headers, data)

    def _forward(
        self, method: str, body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes, bool]:
        """Send the request upstream; return (status, reason, headers, body, upstream_failed)."""
        proxy = self.server.proxy
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=proxy.upstream_timeout)
        try:
            # skip_host/skip_accept_encoding: forward the client's own headers unchanged.
            conn.putrequest(method, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                if k.lower() != "content-length":
                    conn.putheader(k, v)
            if body or method in ("PUT", "POST") or "Content-Length" in self.headers:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            data = f"fault proxy: upstream failed: {exc}".encode()
            out = [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))]
            return 502, "Bad Gateway", out, data, True
        finally:
            conn.close()
        out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
        if method != "HEAD":
            # The body was read whole (and de-chunked): frame it with Content-Length.
            out = [(k, v) for k, v in out if k.lower() != "content-length"]
            out.append(("Content-Length", str(len(data))))
        return resp.status, resp.reason, out, data, False

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except _ResetConnection:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.close()
        except (ConnectionError, TimeoutError):
            # The client went away or idled out: nothing to answer.
            self.close_connection = True

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_PATCH = do_OPTIONS = _handle
