"""Shared parts of the load commands: a `bentoml serve` subprocess, real room photos at realistic sizes,
latency percentiles and the server's memory.

Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import psutil
import requests
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_SERVICE = "service:RoomClassifier"
PHOTO_SOURCES = ("extra/house_rooms", "extra/places365")
ROOM_CLASSES = ("bathroom", "bedroom", "kitchen", "living_room")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(url: str, timeout_s: float, is_alive=lambda: True) -> None:
    """Poll BentoML's /readyz until it answers 200; raise TimeoutError otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_alive():
            raise RuntimeError("server exited before it became ready")
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url}/readyz not ready after {timeout_s:.0f} s")


class BentoServer:
    """`bentoml serve TARGET` on a free loopback port, in its own process group, stopped on exit.

    `target` is an import string (`service:RoomClassifier`, run from the repo root) or a bento tag.
    `env` is added to this process's environment (RC_* settings, BENTOML_HOME).
    """

    def __init__(self, target: str = DEFAULT_SERVICE, env: Mapping[str, str] | None = None,
                 ready_timeout_s: float = 120.0, cwd: Path = REPO_ROOT) -> None:
        self.target, self.env, self.cwd = target, dict(env or {}), cwd
        self.ready_timeout_s = ready_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="bentoml-serve-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "BentoServer":
        command = [sys.executable, "-m", "bentoml", "serve", self.target,
                   "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log_path.open("wb") as log:
            env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", **self.env}
            self.process = subprocess.Popen(command, cwd=self.cwd, env=env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_ready(self.url, self.ready_timeout_s, is_alive=lambda: self.process.poll() is None)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"`{' '.join(command)}` did not become ready; log tail:\n{self.log_tail()}") from exc
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None:
            stop_server_process(self.process)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def rss_bytes(self) -> int:
        """Resident memory of the server and all its worker processes."""
        assert self.process is not None
        return process_tree_rss(self.process.pid)


def stop_server_process(process: subprocess.Popen) -> None:
    """SIGTERM `bentoml serve` (its arbiter stops the workers); SIGKILL it and its workers if it hangs.

    BentoML's workers run in process groups of their own, so they are found as children, by PID, first:
    a signal to the server's process group alone can leave them running.
    """
    if process.poll() is not None:
        return
    workers = psutil.Process(process.pid).children(recursive=True)
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    for worker in workers:
        if worker.is_running():
            worker.kill()


def process_tree_rss(pid: int) -> int:
    """Sum of RSS over a process and its descendants (processes that vanish meanwhile are skipped)."""
    return process_tree_memory(pid, lambda process: process.memory_info().rss)


def process_tree_pss(pid: int) -> int:
    """Sum of PSS over a process and its descendants: shared memory (Ray's object store) counted once, where
    a sum of RSS counts it again in every process that maps it."""
    return process_tree_memory(pid, lambda process: process.memory_full_info().pss)


def process_tree_memory(pid: int, measure) -> int:  # measure: psutil.Process -> bytes
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += measure(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def find_room_photos(data_dir: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` readable photos spread evenly over the four classes of the `extra/` sources."""
    rng = random.Random(seed)
    per_class: dict[str, list[Path]] = {}
    for room in ROOM_CLASSES:
        paths = [p for source in PHOTO_SOURCES for p in sorted((data_dir / source / room).glob("*.jpg"))]
        rng.shuffle(paths)
        per_class[room] = paths
    if not any(per_class.values()):
        raise FileNotFoundError(f"no photos under {data_dir}/extra/*/<class>/ (see {data_dir}/README.md)")
    chosen: list[Path] = []
    while len(chosen) < count and any(per_class.values()):
        for room in ROOM_CLASSES:
            while per_class[room] and len(chosen) < count:
                path = per_class[room].pop()
                if is_readable_image(path):
                    chosen.append(path)
                    break
    return chosen


def is_readable_image(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:
        return False


def resize_to_fill(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale and centre-crop to exactly `size`, keeping the photo's proportions (no stretching)."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    scaled = image.convert("RGB").resize((max(width, round(image.width * scale)),
                                          max(height, round(image.height * scale))), Image.BICUBIC)
    left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
    return scaled.crop((left, top, left + width, top + height))


def write_jpegs(photos: Sequence[Path], size: tuple[int, int], out_dir: Path, quality: int = 90) -> list[Path]:
    """Re-encode each photo as a `size` JPEG (what a phone or listing site uploads) under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, photo in enumerate(photos):
        target = out_dir / f"{index:04d}_{photo.parent.name}_{size[0]}x{size[1]}.jpg"
        with Image.open(photo) as image:
            resize_to_fill(image, size).save(target, "JPEG", quality=quality)
        written.append(target)
    return written


def parse_size(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480)."""
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match:
        raise ValueError(f"size must look like 640x480, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def percentiles_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 (and mean, max) of latencies in milliseconds; NaN when there are none."""
    if not latencies_s:
        return {key: float("nan") for key in ("p50", "p95", "p99", "mean", "max")}
    values = np.asarray(latencies_s) * 1000.0
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)),
            "p99": float(np.percentile(values, 99)), "mean": float(values.mean()), "max": float(values.max())}


def require_loopback_url(parser: argparse.ArgumentParser, url: str | None) -> None:
    """These commands only drive servers on this machine: refuse any other --url."""
    if url and not url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        parser.error("--url must be a loopback address: this command only drives local servers")
