"""Shared fixtures: a tiny real model in a temporary BentoML home, real `bentoml serve` subprocesses on
free ports, and a local HTTP server on 127.0.0.1 that serves test images (and misbehaves on request).

Servers start once per session/module; a server that does not become ready fails the test with the
tail of its log. Nothing here talks to any address outside the loopback range.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from PIL import Image

from benchmarks.common import free_port, stop_server_process

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 120.0  # the CPU is shared with training runs: be patient, fail with the log


# ----------------------------------------------------------------------------------------------------
# The tiny model in a temporary BentoML home


@dataclass(frozen=True)
class TinyModel:
    home: Path
    tag: str
    onnx_path: Path
    metadata: dict[str, Any]


def register_in_home(home: Path) -> TinyModel:
    """Register the tiny model in `home` from a subprocess, so this process's bentoml config is untouched."""
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    out = subprocess.run([sys.executable, "-m", "tests.tiny_model", "--json"], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True, timeout=120)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return TinyModel(home=home, tag=data["tag"], onnx_path=Path(data["path"]) / "model.onnx",
                     metadata=data["metadata"])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return register_in_home(tmp_path_factory.mktemp("bentoml_home"))


# ----------------------------------------------------------------------------------------------------
# `bentoml serve` in a subprocess


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, wait_ready: bool = True):  # -> bentoml.SyncHTTPClient
        import bentoml

        return bentoml.SyncHTTPClient(self.url, timeout=60, server_ready_timeout=None if wait_ready else 0)

    def alive(self) -> bool:
        return self.process.poll() is None


def start_server(home: Path, log_path: Path, wait_ready: bool = True, **settings: str) -> Server:
    """`bentoml serve service:RoomClassifier` on a free port with `settings` as RC_* variables."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("RC_")}
    env.update({"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", **settings})
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "service:RoomClassifier", "--host", "127.0.0.1",
         "--port", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        wait_for(server, "/readyz" if wait_ready else "/livez")
    except BaseException:  # never leave a server behind, whatever stopped the wait
        stop_server(server)
        raise
    return server


def wait_for(server: Server, path: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if not server.alive():
            pytest.fail(f"server exited with {server.process.returncode}:\n{server.log()[-6000:]}")
        try:
            if requests.get(server.url + path, timeout=2).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or too busy starting to answer
            pass
        time.sleep(0.25)
    pytest.fail(f"server not answering {path} after {READY_TIMEOUT_S}s:\n{server.log()[-6000:]}")


def stop_server(server: Server) -> None:
    stop_server_process(server.process)


@pytest.fixture(scope="session")
def server(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The main test server: URL images from `localhost` allowed, short fetch timeouts."""
    srv = start_server(tiny_model.home, tmp_path_factory.mktemp("logs") / "server.log",
                       RC_URL_ALLOWLIST="localhost", RC_FETCH_TOTAL_TIMEOUT_S="2", RC_FETCH_READ_TIMEOUT_S="1",
                       RC_FETCH_CONNECT_TIMEOUT_S="1", RC_MAX_CONCURRENCY="24", RC_MAX_QUEUED="0",
                       RC_MAX_IMAGE_BYTES=str(4 << 20), RC_MAX_REQUEST_BYTES=str(16 << 20), RC_MAX_PIXELS="30000000")
    yield srv
    stop_server(srv)


# ----------------------------------------------------------------------------------------------------
# A local image server (127.0.0.1) for URL inputs


@dataclass
class ImageHost:
    """Serves `files[name]` at /img/<name>, and misbehaving endpoints; counts requests per path."""

    port: int
    files: dict[str, bytes] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)

    def url(self, path: str, host: str = "localhost") -> str:
        return f"http://{host}:{self.port}{path}"

    def add(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return self.url(f"/img/{name}")


# Misbehaving endpoints stop after this long, so a client without a total deadline fails a test instead of
# hanging it.
MISBEHAVE_FOR_S = 8.0
# path -> (what is sent first, what is then sent again and again, one piece every 0.2 s)
SLOW_HEADER_REPLIES = {
    "/drip-headers": (b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a"),  # one endless header line, a byte at a time
    "/continue-forever": (b"", b"HTTP/1.1 100 Continue\r\n\r\n"),  # http.client skips these in a loop
}


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


@pytest.fixture(scope="session")
def image_host() -> Iterator[ImageHost]:
    host = ImageHost(port=0)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(host))
    httpd.daemon_threads = True
    host.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    host.add("red.jpg", solid_jpeg((255, 0, 0)))
    yield host
    httpd.shutdown()
    httpd.server_close()


# ----------------------------------------------------------------------------------------------------
# Small image builders shared by the tests


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def solid_jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (640, 480)) -> bytes:
    return encode(Image.new("RGB", size, colour), "JPEG", quality=92)


REAL_PHOTOS_DIR = Path(os.environ.get("ROOM_TEST_PHOTOS", REPO.parent / "shared" / "data" / "extra" / "house_rooms"))


def real_photos(per_class: int = 2) -> list[Path]:
    """A few real room photos from the shared data folder (read in place, never copied); [] if absent."""
    photos: list[Path] = []
    for label in ("bathroom", "bedroom", "kitchen", "living_room"):
        folder = REAL_PHOTOS_DIR / label
        if folder.is_dir():
            photos += sorted(folder.glob("*.jpg"))[:per_class]
    return photos


# ----------------------------------------------------------------------------------------------------
# Hostile files, built here rather than stored (decompression bombs, huge headers, truncations, ...)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int, bit_depth: int = 8) -> bytes:
    """A real decompression bomb: a valid grayscale PNG of zeros, tiny compressed, huge decoded."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width * bit_depth // 8 + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_with_huge_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims enormous dimensions, with almost no data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_with_huge_header(width: int = 65_000, height: int = 65_000) -> bytes:
    """A small JPEG whose SOF marker is patched to claim width x height."""
    data = bytearray(solid_jpeg((10, 200, 30), size=(16, 16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_with_huge_screen(width: int = 65_535, height: int = 65_535) -> bytes:
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    return data[: int(len(data) * keep)]


def noisy_image(size: tuple[int, int] = (320, 240), seed: int = 0) -> Image.Image:
    """Random pixels: compresses badly, so truncation really cuts image data."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def exif_rotated_jpeg() -> bytes:
    """40x20 image, left half red, right half blue, EXIF Orientation 6 (display rotated 90 deg clockwise)."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95)


def animated_gif(first: tuple[int, int, int], second: tuple[int, int, int]) -> bytes:
    frames = [Image.new("RGB", (64, 64), first), Image.new("RGB", (64, 64), second)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def sixteen_bit_png() -> bytes:
    """16-bit grayscale, every row a ramp 0..65535 (Pillow mode I;16)."""
    import numpy as np

    ramp = np.tile(np.linspace(0, 65535, 256), (64, 1)).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")
