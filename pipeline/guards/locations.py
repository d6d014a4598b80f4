"""Where images may come from: an allow-list policy for image URIs in untrusted manifests.

A manifest is written by someone else, so an image URI in it may point at another bucket, at
`file:///etc/passwd`, at `s3://bkt/images/%2e%2e/secrets`, or at the cloud metadata service
(`http://169.254.169.254/`). `LocationPolicy.check` decides before anything is fetched: it
returns None for an allowed URI and otherwise a reason, which the fetch stage turns into a row
with status `invalid_path`. It makes no request, except a DNS lookup for http(s) hosts.

`safe_http_get` fetches an http(s) image under the same policy: it follows redirects itself,
checks every hop, and connects to the address it checked (not a second lookup), so neither a
redirect nor a DNS answer that changes between check and connect (rebinding) reaches a
private address.

    policy = LocationPolicy(allowed=["s3://bkt/images/", "/data/images/"], allow_local=True)
    policy.check("s3://bkt/images/a.jpg")       # None: allowed
    policy.check("s3://bkt/images/../x.jpg")    # "'..' segment in path"
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from os.path import realpath
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urljoin, urlsplit

if TYPE_CHECKING:
    from pipeline.config import JobConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Alternative spellings fsspec accepts for the same store.
_SCHEME_ALIASES = {"s3a": "s3", "gcs": "gs"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
# S3 (3-63) and GCS (up to 222 with dots) bucket names: lowercase, digits, dots, dashes.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._\-]{1,220}[a-z0-9]$")
_HOST_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_\-]*[A-Za-z0-9_])?$")
_MAX_DECODE_ROUNDS = 3
_MAX_URL_CHARS = 8192
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"
_BIDI_AND_BOM = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff"
)
# NAT64 prefixes: the last 32 bits are an IPv4 address the gateway will connect to.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class UnsafeLocation(ValueError):
    """A location the policy refuses (the row's status is `invalid_path`)."""


class FetchError(OSError):
    """An http(s) fetch failed (status, timeout, connection, too many redirects)."""


class ResponseTooLarge(FetchError):
    """The response is larger than the caller's limit (the row's status is `too_large`)."""


def resolve_host(host: str, port: int) -> list[str]:
    """All addresses `host` resolves to (the default resolver: the system's getaddrinfo)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class HttpTarget:
    """An http(s) URL that passed the policy, with the checked addresses to connect to."""

    url: str
    scheme: str
    host: str  # IDNA-encoded host name, or the IP literal
    port: int
    path: str  # path and query, as sent in the request line
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class LocationPolicy:
    """Allowed image locations.

    Prefixes are directory prefixes: "s3://bkt/images" allows "s3://bkt/images/a.jpg", not
    "s3://bkt/images-old/a.jpg". Local prefixes are absolute paths ("/data/images/" or
    "file:///data/images/"). http(s) prefixes, if any are listed, restrict http(s) URLs to
    them; with none listed, `allow_http` admits any public host.
    """

    allowed: Sequence[str] = ()  # "s3://bucket/prefix/", "gs://b/", "/data/images/", ...
    allow_local: bool = False  # local paths and file:// (still only inside allowed prefixes)
    allow_http: bool = False  # http(s):// URLs (never to loopback/link-local/private hosts)
    max_key_length: int = 1024  # bytes of UTF-8 in an object key / local path / URL path
    # Networks trusted on purpose (an on-prem image server at 10.20.0.0/16, a test server on
    # 127.0.0.1/32): addresses in them pass the address check. Empty by default.
    allowed_networks: Sequence[str] = ()
    resolver: Callable[[str, int], list[str]] = field(default=resolve_host, repr=False)

    def __post_init__(self) -> None:
        allowed = tuple(_normalize_prefix(p) for p in self.allowed)
        object.__setattr__(self, "allowed", allowed)
        nets = tuple(ipaddress.ip_network(n, strict=False) for n in self.allowed_networks)
        object.__setattr__(self, "allowed_networks", nets)
        assert self.max_key_length > 0, "max_key_length must be positive"

    # -- the public check --------------------------------------------------------------------
    def check(self, uri: object) -> str | None:
        """None if `uri` may be fetched, else the reason it may not."""
        try:
            self._check(uri)
        except UnsafeLocation as exc:
            return str(exc)
        return None

    def http_target(self, url: str) -> HttpTarget:
        """Check an http(s) URL and return where to connect; raises `UnsafeLocation`."""
        _check_characters(url)
        scheme = _scheme_of(url)
        if scheme not in ("http", "https"):
            raise UnsafeLocation(f"not an http(s) URL: scheme {scheme!r}")
        return self._check_http(url, scheme)

    # -- by kind of location -----------------------------------------------------------------
    def _check(self, uri: object) -> None:
        if not isinstance(uri, str):
            raise UnsafeLocation(f"image location is not a string ({type(uri).__name__})")
        if not uri:
            raise UnsafeLocation("empty image location")
        _check_characters(uri)
        scheme = _scheme_of(uri)
        if scheme is None:
            self._check_local(uri)
        elif scheme == "file":
            self._check_local(_file_uri_path(uri))
        elif scheme in ("http", "https"):
            self._check_http(uri, scheme)
        else:
            self._check_object(uri, scheme)

    def _check_local(self, path: str) -> None:
        if not self.allow_local:
            raise UnsafeLocation("local paths are not allowed (allow_local is off)")
        if not path.startswith("/"):
            raise UnsafeLocation("relative local paths are not allowed")
        self._check_length(path, "local path")
        _check_segments(path[1:], "path")
        prefixes = [p for p in self.allowed if p.startswith("/")]
        if not any(path.startswith(p) for p in prefixes):
            raise UnsafeLocation("local path is outside the allowed directories")
        # A symlink inside an allowed directory may point anywhere: compare real paths too.
        real = realpath(path)
        if not any(real.startswith(realpath(p).rstrip("/") + "/") for p in prefixes):
            raise UnsafeLocation(
                "local path resolves (through a link) outside the allowed directories"
            )

    def _check_object(self, uri: str, scheme: str) -> None:
        canonical = _SCHEME_ALIASES.get(scheme, scheme)
        if not any(p.startswith(canonical + "://") for p in self.allowed):
            raise UnsafeLocation(f"scheme {scheme!r} is not allowed")
        if not uri[len(scheme) :].startswith("://"):
            raise UnsafeLocation(f"malformed URI (expected {scheme}://bucket/key)")
        rest = uri[len(scheme) + 3 :]
        bucket, _, key = rest.partition("/")
        if not _BUCKET.match(bucket):
            raise UnsafeLocation(f"invalid bucket name {bucket[:80]!r}")
        if not key:
            raise UnsafeLocation("no object key")
        self._check_length(key, "object key")
        _check_segments(key, "key")
        normalized = f"{canonical}://{bucket}/{key}"
        if not any(normalized.startswith(p) for p in self.allowed):
            raise UnsafeLocation(f"{canonical}://{bucket}/... is outside the allowed locations")

    def _check_http(self, url: str, scheme: str) -> HttpTarget:
        if not self.allow_http:
            raise UnsafeLocation("http(s) URLs are not allowed (allow_http is off)")
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError as exc:
            raise UnsafeLocation(f"malformed URL: {exc}") from None
        if "@" in parts.netloc:
            raise UnsafeLocation("credentials in URLs are not allowed")
        if not parts.hostname:
            raise UnsafeLocation("URL has no host")
        # Percent-encode what may not go raw into a request line (non-ASCII, spaces); '%'
        # stays safe so an already-encoded URL is sent as given.
        path = quote(
            (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=_URL_SAFE
        )
        self._check_length(parts.path, "URL path")
        if len(url) > _MAX_URL_CHARS:  # signed URLs carry long queries, hence a larger bound
            raise UnsafeLocation(f"URL too long ({len(url)} chars > {_MAX_URL_CHARS})")
        if parts.path not in ("", "/"):
            _check_segments(parts.path[1:], "URL path", allow_empty=True)
        normalized = f"{scheme}://{parts.netloc.lower()}{parts.path}"
        http_prefixes = [p for p in self.allowed if p.startswith(("http://", "https://"))]
        if http_prefixes and not any(normalized.startswith(p) for p in http_prefixes):
            raise UnsafeLocation("URL is outside the allowed locations")
        host, addresses = self._host_addresses(parts.hostname, port)  # DNS last: no lookup
        return HttpTarget(url, scheme, host, port, path, tuple(addresses))

    def _host_addresses(self, hostname: str, port: int) -> tuple[str, list[str]]:
        """(host to send, checked addresses) for a URL host; raises UnsafeLocation."""
        host = hostname.rstrip(".")
        if "%" in host:
            raise UnsafeLocation("IPv6 zone ids are not allowed")
        literal = _ip_literal(host)
        if literal is not None:
            self._check_address(literal)
            return host, [str(literal)]
        try:
            ascii_host = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise UnsafeLocation(f"invalid host name {host[:80]!r}") from None
        if not all(_HOST_LABEL.match(label) for label in ascii_host.split(".")):
            raise UnsafeLocation(f"invalid host name {host[:80]!r}")
        try:
            addresses = self.resolver(ascii_host, port)
        except (OSError, UnicodeError) as exc:
            raise UnsafeLocation(f"cannot resolve host {ascii_host!r}: {exc}") from None
        if not addresses:
            raise UnsafeLocation(f"host {ascii_host!r} resolves to no address")
        # Every address must pass: a client may pick any of them.
        for address in addresses:
            self._check_address(ipaddress.ip_address(address.split("%", 1)[0]), via=ascii_host)
        return ascii_host, list(addresses)

    def _check_address(self, ip: IPAddress, via: str | None = None) -> None:
        if any(ip in net for net in self.allowed_networks):
            return
        problem = _address_problem(ip)
        if problem:
            where = f"host {via!r} resolves to {ip}" if via else f"address {ip}"
            raise UnsafeLocation(f"{where}, which is {problem}: not allowed")

    def _check_length(self, text: str, what: str) -> None:
        n = len(text.encode("utf-8", "surrogatepass"))
        if n > self.max_key_length:
            raise UnsafeLocation(f"{what} too long ({n} bytes > {self.max_key_length})")


# -- helpers ------------------------------------------------------------------------------------
def _normalize_prefix(prefix: str) -> str:
    """Canonical form of an allowed prefix: aliases folded, file:// stripped, ending in '/'."""
    assert isinstance(prefix, str) and prefix, (
        f"allowed location must be a non-empty string, got {prefix!r}"
    )
    scheme = _scheme_of(prefix)
    if scheme == "file":
        prefix = _file_uri_path(prefix)
    elif scheme is None:
        assert prefix.startswith("/"), f"allowed local location must be absolute, got {prefix!r}"
    else:
        assert "://" in prefix, (
            f"allowed location must look like scheme://bucket/..., got {prefix!r}"
        )
        rest = prefix.split("://", 1)[1]
        if scheme in ("http", "https"):
            netloc, _, path = rest.partition("/")
            rest = f"{netloc.lower()}/{path}"
        prefix = f"{_SCHEME_ALIASES.get(scheme, scheme)}://{rest}"
    return prefix if prefix.endswith("/") else prefix + "/"


def _scheme_of(uri: str) -> str | None:
    """Lower-cased scheme, or None for a plain path."""
    m = _SCHEME.match(uri)
    if m is None:
        return None
    scheme = m.group(1).lower()
    if len(scheme) == 1:
        raise UnsafeLocation("Windows drive paths are not allowed")
    return scheme


def _file_uri_path(uri: str) -> str:
    """The local path of a file:// URI (as fsspec reads it: no percent-decoding)."""
    if not uri[4:].startswith("://"):
        raise UnsafeLocation("malformed file URI (expected file:///absolute/path)")
    rest = uri[7:]
    if rest.startswith("localhost/"):
        rest = rest[len("localhost") :]
    if not rest.startswith("/"):
        raise UnsafeLocation("file URIs naming a host are not allowed")
    return rest


def _bad_char(text: str) -> str | None:
    for ch in text:
        if ch == "\\":
            return "backslash"
        # Cc: C0/C1 controls incl. NUL; Cs: lone surrogates; Zl/Zp: line separators; bidi
        # controls and the BOM make a path read differently than it is. Other invisible
        # format characters (ZWJ/ZWNJ) are ordinary in Persian, Indic and emoji names.
        if ch in _BIDI_AND_BOM or unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"):
            return f"control character U+{ord(ch):04X}"
    return None


def _check_characters(uri: str) -> None:
    if uri != uri.strip():
        raise UnsafeLocation("leading or trailing whitespace in image location")
    bad = _bad_char(uri)
    if bad:
        raise UnsafeLocation(f"{bad} in image location")


def _check_segments(path: str, what: str, allow_empty: bool = False) -> None:
    """Refuse traversal in `path` (no leading '/'), plain or percent-/Unicode-encoded."""
    raw_slashes = path.count("/")
    variants = [path]
    current = path
    for _ in range(_MAX_DECODE_ROUNDS):
        decoded = unquote(current) if "%" in current else current
        if decoded == current:
            break
        variants.append(decoded)
        current = decoded
    else:
        if "%" in current and unquote(current) != current:
            raise UnsafeLocation(f"too many levels of percent-encoding in {what}")
    for i, variant in enumerate(variants):
        # NFKC folds look-alikes such as full-width '．' and '／' that some layers normalize.
        for form in (variant, unicodedata.normalize("NFKC", variant)):
            encoded = i > 0 or form is not variant
            if encoded:
                if form.count("/") > raw_slashes:
                    raise UnsafeLocation(f"encoded '/' in {what}")
                bad = _bad_char(form)
                if bad:
                    raise UnsafeLocation(f"encoded {bad} in {what}")
            for segment in form.split("/"):
                if segment in ("..", "."):
                    how = "encoded " if encoded else ""
                    raise UnsafeLocation(f"{how}'{segment}' segment in {what}")
    if not allow_empty and "" in path.split("/"):
        raise UnsafeLocation(f"empty segment ('//' or trailing '/') in {what}")


def _ip_literal(host: str) -> IPAddress | None:
    """The IP address `host` spells, in any form a resolver accepts, or None for a name.

    Beyond dotted quads this reads the inet_aton forms that C resolvers and browsers accept:
    `2130706433`, `0x7f.1`, `0177.0.0.1`, `127.1`. A host whose last label is numeric but
    is not a valid address ("1.2.3.999", "example.123") is refused, as WHATWG URLs do.
    """
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    labels = host.split(".")
    if not re.fullmatch(r"[0-9]+|0[xX][0-9a-fA-F]*", labels[-1]):
        return None
    numbers = []
    for label in labels:
        if re.fullmatch(r"0[xX][0-9a-fA-F]*", label):
            numbers.append(int(label[2:] or "0", 16))
        elif re.fullmatch(r"0[0-7]+", label):
            numbers.append(int(label, 8))
        elif re.fullmatch(r"[1-9][0-9]*|0", label):
            numbers.append(int(label))
        else:
            raise UnsafeLocation(f"malformed numeric host {host[:80]!r}")
    if len(numbers) > 4 or any(n > 255 for n in numbers[:-1]):
        raise UnsafeLocation(f"malformed numeric host {host[:80]!r}")
    if numbers[-1] >= 256 ** (5 - len(numbers)):
        raise UnsafeLocation(f"malformed numeric host {host[:80]!r}")
    value = 0
    for n in numbers[:-1]:
        value = value * 256 + n
    value = value * 256 ** (5 - len(numbers)) + numbers[-1]
    return ipaddress.IPv4Address(value)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a v6 address carries to (mapped, 6to4, Teredo, NAT64, compatible)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in _NAT64) or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _address_problem(ip: IPAddress) -> str | None:
    """Why an address must not be fetched from, or None for a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            problem = _address_problem(inner)
            if problem:
                return f"{problem} (embeds {inner})"
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("non-public", not ip.is_global),
    )
    return next((name for name, hit in checks if hit), None)


# -- fetching -----------------------------------------------------------------------------------
_REDIRECTS = (301, 302, 303, 307, 308)


def _connection(target: HttpTarget, address: str, timeout: float) -> http.client.HTTPConnection:
    """A connection that sends Host/SNI for the name but connects to the checked address."""
    if target.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            target.host, target.port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)

    def pinned(
        _addr: tuple[str, int], timeout: float = timeout, source: object = None
    ) -> socket.socket:
        return socket.create_connection((address, target.port), timeout)

    conn._create_connection = pinned  # type: ignore[attr-defined]
    return conn


def safe_http_get(
    url: str,
    policy: LocationPolicy,
    max_bytes: int,
    timeout: float = 30.0,
    max_redirects: int = 5,
) -> bytes:
    """GET `url` under `policy`, following at most `max_redirects` checked redirects.

    Raises `UnsafeLocation` (any hop refused: nothing is sent to it), `ResponseTooLarge` (more
    than `max_bytes`), or `FetchError` (non-200 status, timeout, connection failure). `timeout`
    bounds each socket operation and the whole fetch, so a slow-drip server cannot hold a
    worker.
    """
    deadline = time.monotonic() + timeout
    for _hop in range(max_redirects + 1):
        target = policy.http_target(url)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError(f"timed out after {timeout}s")
        conn = _connection(target, target.addresses[0], remaining)
        try:
            conn.request(
                "GET",
                target.path,
                headers={"User-Agent": "ziya-batch", "Accept-Encoding": "identity"},
            )
            resp = conn.getresponse()
            if resp.status in _REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    raise FetchError(f"HTTP {resp.status} redirect without a Location")
                url = urljoin(url, location)
                continue
            if resp.status != 200:
                raise FetchError(f"HTTP {resp.status} {resp.reason}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ResponseTooLarge(f"response is {length} bytes > limit {max_bytes}")
            chunks, size = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise FetchError(f"timed out after {timeout}s")
                # read1 returns what has arrived instead of waiting for a full buffer.
                chunk = resp.read1(65536)
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > max_bytes:
                    raise ResponseTooLarge(f"response exceeds limit {max_bytes} bytes")
                chunks.append(chunk)
        except (UnsafeLocation, FetchError):
            raise
        except (OSError, http.client.HTTPException) as exc:
            raise FetchError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            conn.close()
    raise FetchError(f"more than {max_redirects} redirects")


def default_policy(job: JobConfig, manifest_files: list[str]) -> LocationPolicy:
    """The job's allowed locations; by default the buckets / directories of the manifests (a
    location ending in `/` is a directory itself: input.images)."""
    from pipeline.storage import filesystem, is_remote, protocol_of

    allowed = list(job.limits.allowed_locations)
    if not allowed:
        for uri in manifest_files:
            if is_remote(uri):
                proto = protocol_of(uri)
                bucket = filesystem(uri, job.storage)[1].split("/", 1)[0]
                allowed.append(f"{proto}://{bucket}/")
            else:
                fs, path = filesystem(uri, job.storage)
                folder = path if uri.endswith("/") else fs._parent(path)
                allowed.append(folder.rstrip("/") + "/")
    allow_local = any(
        not is_remote(a) and not a.startswith(("http://", "https://")) for a in allowed
    )
    return LocationPolicy(
        allowed=sorted(set(allowed)),
        allow_local=allow_local,
        allow_http=job.limits.allow_http,
        allowed_networks=job.limits.allowed_networks,
    )
