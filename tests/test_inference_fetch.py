"""URL vetting (unit, with an injected resolver: no DNS, no traffic) and fetching from a loopback host."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from typing import Any, Iterator

import pytest

from inference import fetch
from inference.config import KernelConfig
from inference.errors import InputError
from inference.fetch import UrlPolicy, blocked_reason, fetch_url, parse_ip_literal, vet_url
from testkit.image_host import MISBEHAVE_FOR_S, ImageHost, serving_images
from testkit.images import solid_jpeg

PUBLIC = "93.184.216.34"
DEFAULT_POLICY = KernelConfig().url_policy()  # the service's defaults: no allow-list


def resolver_for(table: dict[str, list[str]]):
    """A resolver that answers from `table` and fails like DNS for anything else."""
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError(-2, "Name or service not known")
        return table[host]
    return resolve


def code_of(url: str, policy: UrlPolicy = DEFAULT_POLICY, table: dict[str, list[str]] | None = None) -> str:
    with pytest.raises(InputError) as caught:
        vet_url(url, policy, resolver_for(table or {}))
    return caught.value.code


# ---- the address rules -------------------------------------------------------------------------------


def test_public_host_is_allowed_and_pinned_to_its_vetted_address() -> None:
    target = vet_url("https://images.example.com/a/b.jpg?x=1", DEFAULT_POLICY,
                     resolver_for({"images.example.com": [PUBLIC]}))
    assert (target.host, target.port, target.path, target.address) == ("images.example.com", 443,
                                                                        "/a/b.jpg?x=1", PUBLIC)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x.jpg", "http://127.1/x.jpg", "http://2130706433/x.jpg", "http://0x7f000001/x.jpg",
    "http://0177.0.0.1/x.jpg", "http://0x7f.0.0.1/x.jpg", "http://[::1]/x.jpg", "http://[::ffff:127.0.0.1]/x.jpg",
    "http://[::ffff:7f00:1]/x.jpg", "http://169.254.169.254/latest/meta-data/", "http://10.0.0.8/x.jpg",
    "http://172.16.5.4/x.jpg", "http://192.168.1.1/x.jpg", "http://100.64.0.1/x.jpg", "http://0.0.0.0/x.jpg",
    "http://0/x.jpg", "http://224.0.0.1/x.jpg", "http://255.255.255.255/x.jpg", "http://240.0.0.1/x.jpg",
    "http://[fe80::1]/x.jpg", "http://[fc00::1]/x.jpg", "http://[ff02::1]/x.jpg", "http://[::]/x.jpg",
    "http://[2002:7f00:1::]/x.jpg", "http://[64:ff9b::a00:1]/x.jpg", "http://[fec0::1]/x.jpg",
    "http://127.0.0.1:3000/x.jpg", "http://[::ffff:169.254.169.254]/",
])
def test_non_public_addresses_are_refused_in_every_spelling(url: str) -> None:
    assert code_of(url) == "url_host_not_allowed"


@pytest.mark.parametrize("host, addresses", [
    ("localhost", ["127.0.0.1", "::1"]),
    ("localhost.", ["127.0.0.1"]),
    ("metadata.google.internal", ["169.254.169.254"]),
    ("rebind.example", [PUBLIC, "10.1.2.3"]),  # one bad address is enough
    ("mapped.example", ["::ffff:10.0.0.1"]),
])
def test_names_resolving_to_non_public_addresses_are_refused(host: str, addresses: list[str]) -> None:
    assert code_of(f"http://{host}/x.jpg", table={host.rstrip("."): addresses}) == "url_host_not_allowed"


@pytest.mark.parametrize("url, code", [
    ("file:///etc/passwd", "url_scheme_not_allowed"), ("gopher://example.com/", "url_scheme_not_allowed"),
    ("ftp://example.com/x.jpg", "url_scheme_not_allowed"), ("dict://example.com:11211/", "url_scheme_not_allowed"),
    ("javascript:alert(1)", "url_scheme_not_allowed"), ("//example.com/x.jpg", "url_scheme_not_allowed"),
    ("example.com/x.jpg", "url_scheme_not_allowed"), ("", "invalid_url"),
    ("http://user:pw@example.com/x.jpg", "invalid_url"), ("http://example.com@127.0.0.1/x.jpg", "invalid_url"),
    ("http:///x.jpg", "invalid_url"), ("http://exa mple.com/", "invalid_url"),
    ("http://a.com/\r\nHost: b", "invalid_url"),
    ("http://example.com:99999/", "invalid_url"), ("http://example.com:port/", "invalid_url"),
    ("http://example.com\\@127.0.0.1/", "invalid_url"), ("http://" + "a" * 3000 + ".com/", "invalid_url"),
    ("http://no-such-host.example/x.jpg", "url_unresolvable"),
])
def test_malformed_and_foreign_urls(url: str, code: str) -> None:
    assert code_of(url, table={"example.com": [PUBLIC]}) == code


def test_allow_list_trusts_named_hosts_and_networks_only() -> None:
    policy = KernelConfig.from_env({"RC_URL_ALLOWLIST": "images.internal, 10.20.0.0/16, "}).url_policy()
    table = {"images.internal": ["10.9.9.9"], "other.internal": ["10.9.9.9"], "cam.internal": ["10.20.3.4"]}
    assert vet_url("http://images.internal/x.jpg", policy, resolver_for(table)).address == "10.9.9.9"
    assert vet_url("http://cam.internal/x.jpg", policy, resolver_for(table)).address == "10.20.3.4"
    assert vet_url("http://IMAGES.internal./x.jpg", policy, resolver_for(table)).host == "images.internal"
    assert vet_url("http://10.20.0.1/x.jpg", policy, resolver_for(table)).address == "10.20.0.1"
    assert code_of("http://other.internal/x.jpg", policy, table) == "url_host_not_allowed"
    assert code_of("http://10.21.0.1/x.jpg", policy, table) == "url_host_not_allowed"
    assert code_of("file://images.internal/x.jpg", policy, table) == "url_scheme_not_allowed"


def test_default_policy_trusts_nothing() -> None:
    assert DEFAULT_POLICY.allow_hosts == frozenset() and DEFAULT_POLICY.allow_networks == ()
    assert code_of("http://localhost/x.jpg", table={"localhost": ["127.0.0.1"]}) == "url_host_not_allowed"


@pytest.mark.parametrize("spelling, expected", [("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"),
                                                ("0177.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"),
                                                ("10.1", "10.0.0.1"), ("::1", "::1"), ("cafe.example", None),
                                                ("1e100.net", None)])
def test_ip_literal_spellings(spelling: str, expected: str | None) -> None:
    parsed = parse_ip_literal(spelling)
    assert (str(parsed) if parsed else None) == expected


def test_public_addresses_have_no_blocked_reason() -> None:
    for address in (PUBLIC, "8.8.8.8", "2606:4700:4700::1111", "2002:5db8:d822::1"):
        assert blocked_reason(ipaddress.ip_address(address)) is None, address


# ---- real downloads from the loopback image host (allowed by name only) ------------------------------

LOCAL = UrlPolicy.with_allowlist(["localhost"], connect_timeout_s=1.0, read_timeout_s=0.5, total_timeout_s=1.5,
                                 max_redirects=3, max_bytes=1 << 20)


def fetch_code(url: str, policy: UrlPolicy = LOCAL) -> str:
    with pytest.raises(InputError) as caught:
        fetch_url(url, policy)
    return caught.value.code


def test_fetch_returns_the_body_whatever_the_content_type(image_host: ImageHost) -> None:
    assert fetch_url(image_host.url("/img/red.jpg"), LOCAL) == image_host.files["red.jpg"]


def test_allow_listed_name_does_not_open_other_spellings_of_the_address(image_host: ImageHost) -> None:
    assert fetch_code(image_host.url("/img/red.jpg", host="127.0.0.1")) == "url_host_not_allowed"
    assert fetch_code(image_host.url("/img/red.jpg", host="[::ffff:127.0.0.1]")) == "url_host_not_allowed"


def test_redirects_are_followed_and_every_hop_is_vetted(image_host: ImageHost) -> None:
    assert fetch_url(image_host.url("/hops/2"), LOCAL) == image_host.files["red.jpg"]
    assert fetch_code(image_host.url("/hops/5")) == "too_many_redirects"
    to_private = image_host.url("/redirect?to=" + image_host.url("/img/red.jpg", host="127.0.0.1"))
    before = image_host.hits.get("/img/red.jpg", 0)
    assert fetch_code(to_private) == "url_host_not_allowed"
    assert image_host.hits.get("/img/red.jpg", 0) == before  # the private hop was never requested
    assert fetch_code(image_host.url("/redirect?to=file:///etc/passwd")) == "url_scheme_not_allowed"
    assert fetch_code(image_host.url("/redirect?to=http://169.254.169.254/")) == "url_host_not_allowed"


def test_timeouts(image_host: ImageHost) -> None:
    for path in ("/slow", "/stall"):
        started = time.monotonic()
        assert fetch_code(image_host.url(path)) == "fetch_timeout"
        assert time.monotonic() - started < LOCAL.total_timeout_s + 1.0


def test_size_limit_is_enforced_while_streaming(image_host: ImageHost) -> None:
    started = time.monotonic()
    assert fetch_code(image_host.url("/endless")) == "image_too_large"
    assert fetch_code(image_host.url("/huge-declared")) == "image_too_large"
    assert time.monotonic() - started < 2.0


def test_http_errors_and_refused_connections(image_host: ImageHost) -> None:
    assert fetch_code(image_host.url("/status/404")) == "fetch_failed"
    assert fetch_code(image_host.url("/status/500")) == "fetch_failed"
    assert fetch_code("http://localhost:1/x.jpg") == "fetch_failed"
    assert fetch_code(image_host.url("/img/red.jpg").replace("http://", "https://")) == "fetch_failed"


def within_total_timeout(url: str, resolver=None) -> str:
    """The refusal code of `url`, asserting it came within the total timeout (plus scheduling slack)."""
    started = time.monotonic()
    with pytest.raises(InputError) as caught:
        fetch_url(url, LOCAL, *([resolver] if resolver else []))
    assert time.monotonic() - started < LOCAL.total_timeout_s + 1.0, url
    return caught.value.code


@pytest.mark.parametrize("path", ["/drip-headers", "/continue-forever", "/trailer-flood"])
def test_total_timeout_holds_while_headers_or_trailers_drip(image_host: ImageHost, path: str) -> None:
    # each byte comes well within the read timeout; only the total deadline can stop these
    assert within_total_timeout(image_host.url(path)) == "fetch_timeout"


@pytest.fixture(scope="module")
def tls_dripper() -> Iterator[int]:
    """A loopback TCP server that starts a TLS record and sends one byte of it every 0.2 s."""
    class Drip(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            stop = time.monotonic() + MISBEHAVE_FOR_S
            try:
                self.request.sendall(b"\x16\x03\x03\x40\x00")  # handshake record of 16 KiB follows...
                while time.monotonic() < stop:
                    self.request.sendall(b"\x00")
                    time.sleep(0.2)
            except OSError:
                pass  # the client gave up

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_total_timeout_holds_during_a_dripping_tls_handshake(tls_dripper: int) -> None:
    assert within_total_timeout(f"https://localhost:{tls_dripper}/x.jpg") == "fetch_timeout"


def test_deadlines_fire_in_order_from_one_thread() -> None:
    deadlines = fetch.DeadlineThread()
    fired: list[str] = []
    now = time.monotonic()
    for name, delay in [("late", 0.3), ("early", 0.1), ("never", 30.0)]:
        deadlines.add(now + delay, lambda name=name: fired.append(name))
    time.sleep(0.6)
    assert fired == ["early", "late"]
    threads = threading.active_count()
    for _ in range(50):
        deadlines.add(time.monotonic() + 0.05, lambda: None)
    assert threading.active_count() == threads  # no thread per deadline


def test_watchdog_shuts_its_socket_down_at_the_deadline_unless_stopped() -> None:
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        cut, spared = fetch.Watchdog(time.monotonic() + 0.1), fetch.Watchdog(time.monotonic() + 0.1)
        cut.watch(pairs[0][0])
        spared.watch(pairs[1][0])
        spared.stop()
        time.sleep(0.4)
        assert cut.fired and pairs[0][0].recv(1) == b""  # shut down: reads end at once
        assert not spared.fired
        pairs[1][1].sendall(b"x")
        assert pairs[1][0].recv(1) == b"x"
    finally:
        for pair in pairs:
            for end in pair:
                end.close()


def test_slow_dns_counts_against_the_total_timeout() -> None:
    def slow_resolver(host: str, port: int) -> list[str]:
        time.sleep(LOCAL.total_timeout_s + 2.0)
        return ["127.0.0.1"]

    assert within_total_timeout("http://localhost:1/x.jpg", slow_resolver) == "fetch_timeout"


# ---- several addresses, one TLS context, no https -> http downgrade --------------------------------------


def test_the_next_vetted_address_is_tried_when_the_first_refuses(image_host: ImageHost) -> None:
    # the image host listens on 127.0.0.1 only, so 127.0.0.2 (loopback too) refuses the connection
    two = resolver_for({"localhost": ["127.0.0.2", "127.0.0.1"]})
    assert fetch_url(image_host.url("/img/red.jpg"), LOCAL, two) == image_host.files["red.jpg"]


def test_tls_context_is_built_once_not_per_request(image_host: ImageHost, monkeypatch: pytest.MonkeyPatch) -> None:
    https = image_host.url("/img/red.jpg").replace("http://", "https://")
    fetch_code(https)  # the context may be built (once) on first use
    created = []
    original_new = ssl.SSLContext.__new__

    def counting_new(cls: type, *args: Any, **kwargs: Any) -> ssl.SSLContext:
        created.append(cls)
        return original_new(cls, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "__new__", counting_new)
    for _ in range(2):  # the image host speaks plain HTTP: TLS fails, after the context was used
        assert fetch_code(https) == "fetch_failed"
    assert created == []


@pytest.fixture(scope="module")
def tls_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ImageHost, ssl.SSLContext]]:
    """An HTTPS image host on 127.0.0.1 with a throw-away certificate for `localhost`, and a client
    context that trusts exactly that certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    with serving_images(tls=server_context) as host:
        host.add("red.jpg", solid_jpeg((255, 0, 0)))
        yield host, ssl.create_default_context(cafile=str(cert))


def test_https_is_fetched_and_an_https_to_http_redirect_is_refused(
        tls_host: tuple[ImageHost, ssl.SSLContext], image_host: ImageHost, monkeypatch: pytest.MonkeyPatch) -> None:
    host, trusting = tls_host
    monkeypatch.setattr(fetch, "tls_context", lambda: trusting)
    secure = host.url("/img/red.jpg").replace("http://", "https://")
    assert fetch_url(secure, LOCAL) == host.files["red.jpg"]
    to_secure = host.url("/redirect?to=" + secure).replace("http://", "https://", 1)
    assert fetch_url(to_secure, LOCAL) == host.files["red.jpg"]
    before = image_host.hits.get("/img/red.jpg", 0)
    downgrade = host.url("/redirect?to=" + image_host.url("/img/red.jpg")).replace("http://", "https://", 1)
    with pytest.raises(InputError) as caught:
        fetch_url(downgrade, LOCAL)
    assert caught.value.code == "url_scheme_not_allowed" and "https to http" in caught.value.message
    assert image_host.hits.get("/img/red.jpg", 0) == before  # the plain-HTTP hop was never requested
