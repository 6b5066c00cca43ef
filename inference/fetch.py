"""Download an image from a user-given URL without becoming an SSRF proxy.

`fetch_url(url, policy)` returns the body bytes or raises `inference.errors.InputError`. Rules:

- only `http` and `https`; no credentials in the URL; at most 2048 characters;
- the host is resolved once and *every* address it resolves to must be public: private, loopback,
  link-local, multicast, reserved, unspecified, shared (CGNAT) and other non-global ranges are refused,
  for IPv4 and IPv6, including IPv4 addresses embedded in IPv6 (mapped, 6to4, NAT64) and the
  decimal/octal/hex spellings of IPv4 (`2130706433`, `0177.0.0.1`, `0x7f000001`);
- the connection goes to the address that was vetted (the TLS certificate and the Host header still
  use the host name), so DNS cannot answer differently between check and use (no rebinding window);
- if the host has several (all vetted) addresses, the next one is tried when connecting to one fails;
- redirects are followed by hand, at most `max_redirects`, and every hop is vetted like the first; an
  https URL never redirects to plain http (`url_scheme_not_allowed`);
- connect, per-read and total timeouts. The total deadline covers everything: DNS runs in a worker
  thread that is abandoned at the deadline (getaddrinfo has no timeout of its own), and a watchdog
  (one thread for all downloads) shuts the socket down at the deadline wherever http.client is blocked
  (TLS handshake, status and header lines dripped a byte at a time, endless `100 Continue`, an endless
  chunked trailer). Without it a hostile server could hold a worker thread, and so a concurrency slot,
  forever;
- the body is read in chunks and the download stops as soon as it passes `max_bytes` (a declared
  Content-Length over the limit stops it before reading);
- the response's Content-Type is ignored: the caller checks the bytes themselves (`decode_image`).

`UrlPolicy.allow_hosts`/`allow_networks` hold trusted host names (exact match) and networks (CIDR) for private
deployments; a trusted host or network skips the address check, nothing else. They are empty unless given.
The timeouts and limits have no defaults here: they are settings (RC_FETCH_*, RC_MAX_IMAGE_BYTES), declared
once in `inference.config`, whose `KernelConfig.url_policy()` builds a `UrlPolicy`.
`vet_url` takes a `resolver` argument so the address rules can be tested without DNS.
"""

from __future__ import annotations

import functools
import heapq
import http.client
import ipaddress
import itertools
import os
import re
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable, Iterable
from urllib.parse import urljoin, urlsplit

from inference.errors import ErrorCode, InputError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

MAX_URL_LENGTH = 2048
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK_BYTES = 64 * 1024
USER_AGENT = "room-classifier/0.1 (+image fetch)"
_NUMERIC_HOST = re.compile(r"^[0-9a-fA-FxX.]+$")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")
# Lookups run here so they can be abandoned at the deadline; a few stuck ones cannot starve the service.
_RESOLVER_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fetch-dns")


@dataclass(frozen=True)
class UrlPolicy:
    """Where image URLs may point and how long/large a download may be."""

    connect_timeout_s: float
    read_timeout_s: float
    total_timeout_s: float
    max_redirects: int
    max_bytes: int
    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[IPNetwork, ...] = ()
    schemes: tuple[str, ...] = field(default=("http", "https"))

    @classmethod
    def with_allowlist(cls, entries: Iterable[str], **settings: float | int) -> "UrlPolicy":
        """Split allow-list entries into networks (anything `ip_network` parses) and host names."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in (item.strip() for item in entries):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                hosts.add(normalise_host(entry))
        return cls(allow_hosts=frozenset(hosts), allow_networks=tuple(networks), **settings)

    def trusts(self, host: str, address: IPAddress) -> bool:
        return host in self.allow_hosts or any(address in network for network in self.allow_networks)


@dataclass(frozen=True)
class Target:
    """A vetted URL: connect to one of `addresses`, but speak to `host` (SNI, certificate, Host header)."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[str, ...]

    @property
    def address(self) -> str:
        """The first vetted address, the one tried first."""
        return self.addresses[0]


def system_resolver(host: str, port: int) -> list[str]:
    """All addresses the system resolver gives for `host` (TCP)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def fetch_url(url: str, policy: UrlPolicy, resolver: Resolver = system_resolver) -> bytes:
    """Vet and download `url` following at most `policy.max_redirects` vetted redirects."""
    deadline = time.monotonic() + policy.total_timeout_s
    for _ in range(policy.max_redirects + 1):
        target = vet_url(url, policy, resolver_with_deadline(resolver, deadline))
        location, body = request_once(target, policy, deadline)
        if location is None:
            return body
        url = urljoin(target.url, location)
        refuse_downgrade(target, url)
    raise InputError(ErrorCode.TOO_MANY_REDIRECTS, f"more than {policy.max_redirects} redirects")


def refuse_downgrade(target: Target, next_url: str) -> None:
    """An https page must not send us to plain http: the image would travel unprotected."""
    if target.scheme == "https" and urlsplit(next_url).scheme.lower() == "http":
        raise InputError(ErrorCode.URL_SCHEME_NOT_ALLOWED,
                         f"{target.host} redirected from https to http; a downgrade to plain http is refused")


def resolver_with_deadline(resolver: Resolver, deadline: float) -> Resolver:
    """`resolver`, but giving up with fetch_timeout at `deadline` (the lookup thread is left to finish)."""
    def resolve_in_time(host: str, port: int) -> list[str]:
        future = _RESOLVER_POOL.submit(resolver, host, port)
        try:
            return future.result(timeout=remaining(deadline))
        except FutureTimeout:
            future.cancel()
            raise InputError(ErrorCode.FETCH_TIMEOUT,
                             f"resolving {host} took longer than the total time limit") from None
    return resolve_in_time


def vet_url(url: str, policy: UrlPolicy, resolver: Resolver = system_resolver) -> Target:
    """Check the URL's form and every address its host resolves to; return where to connect."""
    parts = split_url(url, policy)
    host = normalise_host(parts.hostname or "")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = resolve(host, port, resolver)
    for address in addresses:
        reason = blocked_reason(address)
        if reason is not None and not policy.trusts(host, address):
            shown = host if host == str(address) else f"{host} ({address})"
            raise InputError(ErrorCode.URL_HOST_NOT_ALLOWED,
                             f"{shown} is a {reason} address; only public hosts are fetched")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url=url, scheme=parts.scheme, host=host, port=port, path=path,
                  addresses=tuple(str(address) for address in addresses))


def split_url(url: str, policy: UrlPolicy):  # -> urllib.parse.SplitResult
    if not isinstance(url, str) or not url:
        raise InputError(ErrorCode.INVALID_URL, "the URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise InputError(ErrorCode.INVALID_URL, f"the URL is longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 or ch == "\\" for ch in url):
        raise InputError(ErrorCode.INVALID_URL, "the URL contains whitespace, control characters or backslashes")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise InputError(ErrorCode.INVALID_URL, f"the URL cannot be parsed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in policy.schemes:
        shown = f"'{scheme}'" if scheme else "no scheme"
        raise InputError(ErrorCode.URL_SCHEME_NOT_ALLOWED,
                         f"{shown}: only {' and '.join(policy.schemes)} URLs are fetched")
    if parts.username is not None or parts.password is not None:
        raise InputError(ErrorCode.INVALID_URL, "URLs with credentials (user@host) are not accepted")
    if not parts.hostname:
        raise InputError(ErrorCode.INVALID_URL, "the URL has no host")
    return parts._replace(scheme=scheme)


def normalise_host(host: str) -> str:
    """Lower-case, IDNA-encoded host name without a trailing dot (IPv6 literals without brackets)."""
    host = host.strip().strip("[]").lower().rstrip(".")
    if not host:
        raise InputError(ErrorCode.INVALID_URL, "the URL has no host")
    if ":" in host:  # IPv6 literal: no IDNA
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        raise InputError(ErrorCode.INVALID_URL, f"the host name {host!r} is not valid") from None


def resolve(host: str, port: int, resolver: Resolver) -> list[IPAddress]:
    """Literal IPs (any spelling) parse directly; names go through the resolver."""
    literal = parse_ip_literal(host)
    if literal is not None:
        return [literal]
    try:
        found = resolver(host, port)
    except (OSError, UnicodeError) as exc:
        raise InputError(ErrorCode.URL_UNRESOLVABLE, f"the host {host} cannot be resolved ({exc})") from None
    addresses = []
    for item in found:
        try:
            addresses.append(ipaddress.ip_address(item.split("%")[0]))
        except ValueError:
            raise InputError(ErrorCode.URL_UNRESOLVABLE,
                             f"the host {host} resolved to an invalid address {item!r}") from None
    if not addresses:
        raise InputError(ErrorCode.URL_UNRESOLVABLE, f"the host {host} has no address")
    return addresses


def parse_ip_literal(host: str) -> IPAddress | None:
    """`127.0.0.1`, `::1`, and the inet_aton spellings `2130706433`, `0177.0.0.1`, `0x7f.1`, ..."""
    try:
        return ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        pass
    if _NUMERIC_HOST.match(host) and host[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host.rstrip(".")))
        except OSError:
            return None
    return None


def blocked_reason(address: IPAddress) -> str | None:
    """Why an address must not be fetched from (None for public unicast addresses)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = embedded_ipv4(address)
        if embedded is not None:
            reason = blocked_reason(embedded)
            if reason is not None:
                return f"{reason} (IPv4 {embedded} inside IPv6)"
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("shared (carrier-grade NAT)", isinstance(address, ipaddress.IPv4Address) and address in _SHARED),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("site-local", isinstance(address, ipaddress.IPv6Address) and address.is_site_local),
        ("non-public", not address.is_global),
    )
    return next((reason for reason, hit in checks if hit), None)


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped, IPv4-compatible, 6to4 or NAT64 IPv6 address."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (int(address) >> 32 == 0 and int(address) > 1):  # NAT64 or ::a.b.c.d
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


class Watchdog:
    """Shuts the watched socket down at the deadline, so no blocking call inside http.client outlives it.

    Per-read timeouts cannot bound a server that sends a byte just before each one runs out; shutting
    the socket down from another thread (`DEADLINES`) makes the blocked call return at once, wherever it is.
    """

    def __init__(self, deadline: float) -> None:
        self.fired = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._stopped = False
        DEADLINES.add(deadline, self._fire)

    def watch(self, sock: socket.socket) -> None:
        """Watch `sock` from now on (the TLS socket replaces the TCP one it wraps)."""
        with self._lock:
            self._sock = sock
            if self.fired:
                _shut_down(sock)

    def check(self) -> None:
        """Raise fetch_timeout if the deadline cut the connection (what was read may look complete)."""
        if self.fired:
            raise InputError(ErrorCode.FETCH_TIMEOUT, "the download took longer than the total time limit")

    def stop(self) -> None:
        """Before the socket is closed: its file descriptor may be reused by another socket afterwards."""
        with self._lock:
            self._stopped = True
            self._sock = None

    def _fire(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self.fired = True
            if self._sock is not None:
                _shut_down(self._sock)


class DeadlineThread:
    """One daemon thread that calls each `add`ed function at its deadline (time.monotonic()), in deadline order.

    It replaces a `threading.Timer` per download, which started and ended a thread each time. A stopped watchdog
    stays queued until its deadline and then does nothing: downloads share one total timeout, so deadlines come
    in order and a new one almost never wakes the thread.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked child has the queue but not the thread

    def _reset(self) -> None:
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, deadline: float, fire: Callable[[], None]) -> None:
        with self._changed:
            heapq.heappush(self._queue, (deadline, next(self._order), fire))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-deadlines", daemon=True)
                self._thread.start()
            elif self._queue[0][2] is fire:  # the earliest deadline now: the thread sleeps too long
                self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._queue or self._queue[0][0] > time.monotonic():
                    self._changed.wait(self._queue[0][0] - time.monotonic() if self._queue else None)
                _, _, fire = heapq.heappop(self._queue)
            fire()


DEADLINES = DeadlineThread()


def _shut_down(sock: socket.socket) -> None:
    """Plain socket shutdown, also for TLS sockets (whose own shutdown() would change their state)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected


@functools.lru_cache(maxsize=1)
def tls_context() -> ssl.SSLContext:
    """One verifying TLS context for every request: building one reads the CA bundle (milliseconds)."""
    return ssl.create_default_context()


def open_socket(target: Target, policy: UrlPolicy, deadline: float, watchdog: Watchdog) -> socket.socket:
    """Connect to a vetted address, watched from the start; TLS (when https) against the URL's host."""
    sock = connect_any(target, policy, deadline)
    watchdog.watch(sock)
    if target.scheme != "https":
        return sock
    tls = tls_context().wrap_socket(sock, server_hostname=target.host, do_handshake_on_connect=False)
    watchdog.watch(tls)
    tls.do_handshake()
    return tls


def connect_any(target: Target, policy: UrlPolicy, deadline: float) -> socket.socket:
    """Connect to the first vetted address that accepts: one dead address of a host must not fail it."""
    failure: OSError | None = None
    for address in target.addresses:
        try:
            return socket.create_connection((address, target.port), min(policy.connect_timeout_s, remaining(deadline)))
        except OSError as exc:
            failure = exc
    assert failure is not None  # vet_url never returns a target without addresses
    raise failure


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP connection whose socket comes from `open_socket` (vetted address); Host header from the URL."""

    def __init__(self, target: Target, opener: Callable[[], socket.socket]) -> None:
        super().__init__(target.host, target.port)
        self._opener = opener

    def connect(self) -> None:
        self.sock = self._opener()


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS connection whose socket, TLS included, comes from `open_socket`."""

    def __init__(self, target: Target, opener: Callable[[], socket.socket]) -> None:
        super().__init__(target.host, target.port, context=tls_context())  # else it builds one per request
        self._opener = opener

    def connect(self) -> None:
        self.sock = self._opener()


def request_once(target: Target, policy: UrlPolicy, deadline: float) -> tuple[str | None, bytes]:
    """One GET. Returns (redirect location, b"") for a redirect, else (None, body)."""
    watchdog = Watchdog(deadline)
    connection_type = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    connection = connection_type(target, lambda: open_socket(target, policy, deadline, watchdog))
    try:
        connection.connect()
        sock = connection.sock  # http.client may drop its reference once the response owns the socket
        sock.settimeout(read_timeout(policy, deadline))
        connection.request("GET", target.path, headers={
            "User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"})
        response = connection.getresponse()
        watchdog.check()
        if response.status in REDIRECT_STATUSES:
            location = response.getheader("Location")
            if not location:
                raise InputError(ErrorCode.FETCH_FAILED, f"{target.host} answered {response.status} without a Location")
            return location, b""
        if response.status != 200:
            raise InputError(ErrorCode.FETCH_FAILED, f"{target.host} answered HTTP {response.status} {response.reason}")
        body = read_limited(response, sock, policy, deadline)
        watchdog.check()
        return None, body
    except (OSError, http.client.HTTPException, ValueError) as exc:  # socket.timeout and SSLError included
        watchdog.check()  # whatever failed, a cut at the deadline is a timeout
        raise fetch_error(exc, target) from None
    finally:
        watchdog.stop()
        connection.close()


def fetch_error(exc: Exception, target: Target) -> InputError:
    """The stable code for a failed connection, TLS handshake or HTTP exchange."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return InputError(ErrorCode.FETCH_TIMEOUT, f"{target.host} did not answer in time")
    if isinstance(exc, ssl.SSLError):
        return InputError(ErrorCode.FETCH_FAILED, f"TLS with {target.host} failed ({exc.reason or exc})")
    return InputError(ErrorCode.FETCH_FAILED, f"cannot download from {target.host} ({type(exc).__name__}: {exc})")


def read_limited(response: http.client.HTTPResponse, sock: socket.socket, policy: UrlPolicy,
                 deadline: float) -> bytes:
    """Read the body in chunks; stop at `max_bytes` or at the deadline, whichever comes first."""
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
        raise InputError(ErrorCode.IMAGE_TOO_LARGE,
                         f"the image is {declared} bytes; the limit is {policy.max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        sock.settimeout(read_timeout(policy, deadline))
        chunk = response.read1(CHUNK_BYTES)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > policy.max_bytes:
            raise InputError(ErrorCode.IMAGE_TOO_LARGE,
                             f"the download passed the limit of {policy.max_bytes} bytes; stopped")
        chunks.append(chunk)


def remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise InputError(ErrorCode.FETCH_TIMEOUT, "the download took longer than the total time limit")
    return left


def read_timeout(policy: UrlPolicy, deadline: float) -> float:
    return min(policy.read_timeout_s, remaining(deadline))
