"""`bentoml serve` in a subprocess on a free 127.0.0.1 port, waited for until it answers, stopped by PID.

One launcher for the tests (the tiny model, RC_* settings per fixture) and the load commands (a real model).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SERVICE = "service:RoomClassifier"
READY_TIMEOUT_S = 120.0  # the CPU is shared with training runs: be patient, fail with the log


class ServerNotReady(RuntimeError):
    """A server exited, or did not answer in time; the message says which and ends with its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout_s: float, is_alive: Callable[[], bool] = lambda: True,
                  want_status: int | None = 200) -> None:
    """Poll `url` until it answers `want_status` (any status when None); raise ServerNotReady when the
    process behind it exits (`is_alive`) or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_alive():
            raise ServerNotReady(f"the server exited before {url} answered")
        try:
            status = requests.get(url, timeout=2).status_code
            if want_status is None or status == want_status:
                return
        except requests.RequestException:  # not listening yet, or too busy starting to answer
            pass
        time.sleep(0.25)
    raise ServerNotReady(f"{url} not answering after {timeout_s:.0f} s")


@dataclass
class BentoServer:
    """A running `bentoml serve` (made by `start_bento_server`); a context manager that stops it on exit."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def __enter__(self) -> BentoServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        stop_server_process(self.process)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def client(self, wait_ready: bool = True, token: str | None = None):  # -> bentoml.SyncHTTPClient
        """BentoML's generated client; `token` is an API key, sent as `Authorization: Bearer <token>`."""
        import bentoml

        return bentoml.SyncHTTPClient(self.url, timeout=60, server_ready_timeout=None if wait_ready else 0,
                                      token=token)

    def rss_bytes(self) -> int:
        """Resident memory of the server and all its worker processes."""
        return process_tree_rss(self.process.pid)


def start_bento_server(target: str = DEFAULT_SERVICE, env: Mapping[str, str] | None = None, *,
                       log_path: Path | None = None, ready_path: str = "/readyz",
                       ready_timeout_s: float = READY_TIMEOUT_S, cwd: Path = REPO_ROOT,
                       inherit_rc_settings: bool = True) -> BentoServer:
    """`bentoml serve TARGET` on a free loopback port, in a session of its own, once `ready_path` answers 200.

    `target` is an import string (`service:RoomClassifier`, served from `cwd`, the repo root) or a bento tag.
    `env` is added to this process's environment (RC_* settings, BENTOML_HOME); with
    `inherit_rc_settings=False` this process's own RC_* variables are dropped first, so that only `env`
    configures the service (the tests' `serve_model_home`). A server that does not become ready is stopped,
    and ServerNotReady carries the tail of its log.
    """
    port = free_port()
    inherited = {key: value for key, value in os.environ.items()
                 if inherit_rc_settings or not key.startswith("RC_")}
    full_env = {**inherited, "BENTOML_DO_NOT_TRACK": "true", **(env or {})}
    if log_path is None:
        log_path = Path(tempfile.mkstemp(prefix="bentoml-serve-", suffix=".log")[1])
    command = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = BentoServer(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        wait_for_http(server.url + ready_path, ready_timeout_s, is_alive=server.alive)
    except BaseException as exc:  # never leave a server behind, whatever stopped the wait
        server.stop()
        if isinstance(exc, ServerNotReady):
            raise ServerNotReady(f"`{' '.join(command)}`: {exc}; log tail:\n{server.log_tail()}") from None
        raise
    return server


def serve_model_home(home: Path, log_path: Path, ready_path: str = "/readyz", **settings: str) -> BentoServer:
    """This repo's service on the model in BentoML home `home`, configured by the RC_* `settings` alone (this
    process's own RC_* variables are dropped), so a test server is the same on every machine."""
    return start_bento_server(env={"BENTOML_HOME": str(home), **settings}, log_path=log_path, ready_path=ready_path,
                              inherit_rc_settings=False)


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


def process_tree_memory(pid: int, measure: Callable[[psutil.Process], int]) -> int:
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
