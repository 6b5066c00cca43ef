"""Local image hosts on 127.0.0.1 for URL inputs.

- `serving_images()`: a Python HTTP server in a thread that serves `files[name]` at /img/<name>, redirects,
  and misbehaving endpoints (slow, stalled, endless, dripped headers); it counts requests per path. Used by
  the tests and the soak.
- `nginx_serving(root)`: nginx serving a folder, for the speed benchmark, where the host must not be the
  bottleneck.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from testkit.server import free_port, wait_for_http

# Misbehaving endpoints stop after this long, so a client without a total deadline fails a test instead of
# hanging it.
MISBEHAVE_FOR_S = 8.0
# path -> (what is sent first, what is then sent again and again, one piece every 0.2 s)
SLOW_HEADER_REPLIES = {
    "/drip-headers": (b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a"),  # one endless header line, a byte at a time
    "/continue-forever": (b"", b"HTTP/1.1 100 Continue\r\n\r\n"),  # http.client skips these in a loop
}


@dataclass
class ImageHost:
    """Serves `files[name]` at /img/<name>, and misbehaving endpoints; counts requests per path."""

    port: int
    files: dict[str, bytes] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)

    def url(self, path: str, host: str = "localhost") -> str:
        return f"http://{host}:{self.port}{path}"

    def add(self, name: str, data: bytes, host: str = "localhost") -> str:
        """Serve `data` at /img/<name>; return its URL (with `host`: the service allow-lists hosts by name)."""
        self.files[name] = data
        return self.url(f"/img/{name}", host)


@contextmanager
def serving_images(tls: ssl.SSLContext | None = None) -> Iterator[ImageHost]:
    """An ImageHost listening on 127.0.0.1 in a daemon thread (HTTPS with a server-side `tls` context)."""
    host = ImageHost(port=0)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(host))
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    httpd.daemon_threads = True
    host.port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield host
    finally:
        httpd.shutdown()
        httpd.server_close()


def make_handler(host: ImageHost) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            parts = urlsplit(self.path)
            host.hits[parts.path] = host.hits.get(parts.path, 0) + 1
            query = parse_qs(parts.query)
            try:
                self.route(parts.path, query)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeouts, size limits): expected

        def route(self, path: str, query: dict[str, list[str]]) -> None:
            if path.startswith("/img/") and path[5:] in host.files:
                # a deliberately wrong Content-Type: the service must look at the bytes
                self.reply(200, host.files[path[5:]], content_type="text/plain")
            elif path == "/redirect":
                self.send_response(302)
                self.send_header("Location", query["to"][0])
                self.end_headers()
            elif path.startswith("/hops/"):
                left = int(path.rsplit("/", 1)[1])
                self.send_response(302)
                self.send_header("Location", f"/hops/{left - 1}" if left > 0 else "/img/red.jpg")
                self.end_headers()
            elif path == "/slow":  # a byte every 0.3 s: never finishes within the total timeout
                self.send_response(200)
                self.end_headers()
                for _ in range(200):
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    time.sleep(0.3)
            elif path == "/stall":  # headers, then silence
                self.send_response(200)
                self.end_headers()
                self.wfile.flush()
                time.sleep(10)
            elif path == "/endless":  # no Content-Length, bytes forever
                self.send_response(200)
                self.end_headers()
                chunk = b"\x00" * 65536
                for _ in range(100_000):
                    self.wfile.write(chunk)
            elif path in SLOW_HEADER_REPLIES:  # every byte within the read timeout, never a full answer
                self.drip(*SLOW_HEADER_REPLIES[path])
            elif path == "/trailer-flood":  # a tiny chunked body, then trailer lines that never end
                self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n")
                line = b"X-Trailer: " + b"t" * 60_000 + b"\r\n"
                self.drip(b"", line, pause_s=0.01)
            elif path == "/huge-declared":
                self.send_response(200)
                self.send_header("Content-Length", str(10**12))
                self.end_headers()
            elif path.startswith("/status/"):
                self.reply(int(path.rsplit("/", 1)[1]), b"no image here")
            else:
                self.reply(404, b"not found")

        def drip(self, opening: bytes, piece: bytes, pause_s: float = 0.2, for_s: float = MISBEHAVE_FOR_S) -> None:
            """Send `opening`, then `piece` every `pause_s` for `for_s` seconds (then give up and close)."""
            self.close_connection = True
            self.wfile.write(opening)
            stop = time.monotonic() + for_s
            while time.monotonic() < stop:
                self.wfile.write(piece)
                self.wfile.flush()
                time.sleep(pause_s)

        def reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@contextmanager
def nginx_serving(root: Path) -> Iterator[str]:
    """nginx serving `root` on a free 127.0.0.1 port (one worker, no access log); yields its base URL.

    nginx's worker drops root privileges, so `root` is made world-readable (temporary folders are 0700).
    """
    root.chmod(0o755)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise SystemExit("nginx not found: apt-get install nginx-light (or nginx)")
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="rc-nginx-"))
    temp_paths = "".join(f"{kind}_temp_path {workdir}/{kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (workdir / "nginx.conf").write_text(f"""
daemon off; worker_processes 1; pid {workdir}/nginx.pid; error_log stderr warn;
events {{ worker_connections 256; }}
http {{
  access_log off; {temp_paths}
  server {{ listen 127.0.0.1:{port}; root {root}; location / {{ }} }}
}}
""")
    process = subprocess.Popen([nginx, "-c", str(workdir / "nginx.conf"), "-p", str(workdir)],
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", 10.0, is_alive=lambda: process.poll() is None,
                      want_status=None)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
