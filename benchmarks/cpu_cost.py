"""CPU time per request: what the service spends on a request, against the bare model's CPU time per image.

Requests/s moves with whatever else runs on the machine; CPU seconds per request (the server's process tree,
from /proc via psutil, divided by the answers it gave) does much less, so this command reads speed that way and
can compare code on a busy machine. It serves this checkout (and, with `--against DIR`, another checkout, e.g.
an exported older commit) with `bentoml serve`, drives it with `wrk` (`benchmarks/wrk/`) at N requests in
flight on the photos of `benchmarks.speed` (real room photos re-encoded at listing quality), alternating the
servers run by run, and prints CPU µs per request next to the bare loop's CPU µs per image
(`inference/` decode + preprocess + ONNX Runtime + postprocess, one image at a time, one ONNX Runtime thread).

With `--profile DIR` it also samples each server with py-spy during one extra run and splits its CPU
time into parts (HTTP, middlewares, multipart, validation, temp files, decode, model, JSON, ...): the
breakdown in docs/serving-profile.md.

    python -m benchmarks.cpu_cost --sizes 640x480 --modes upload,url --seconds 10
    git archive HEAD~3 | tar -x -C /tmp/rc-before
    python -m benchmarks.cpu_cost --against /tmp/rc-before --rounds 3      # A/B, alternating runs
    python -m benchmarks.cpu_cost --profile artifacts/profile               # py-spy breakdown by part
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import psutil

from benchmarks.speed import LISTING_QUALITY, WrkResult, bare_pipeline, benchmark_photos, request_lists, run_wrk
from testkit.image_host import nginx_serving
from testkit.photos import DEFAULT_DATA
from testkit.server import REPO_ROOT, BentoServer, start_bento_server

# ----------------------------------------------------------------------------------------------------
# CPU time


@dataclass(frozen=True)
class Cpu:
    """CPU seconds used so far by a `bentoml serve` tree: all of it, and its workers' main threads alone (the event
    loop: HTTP, middlewares, parsing, the handler, JSON; decoding and the model run in other threads)."""

    total: float
    loop: float

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.total - other.total, self.loop - other.loop)


def tree_cpu(pid: int) -> Cpu:
    """User + system CPU seconds of a process and its descendants (those alive now)."""
    root = psutil.Process(pid)
    total = loop = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
            if process.pid != pid:  # a worker: its main thread runs the event loop
                main = next(thread for thread in process.threads() if thread.id == process.pid)
                loop += main.user_time + main.system_time
        except (psutil.NoSuchProcess, StopIteration):
            pass
    return Cpu(total, loop)


def bare_cpu_us(model_tag: str, files: Sequence[str], images: int) -> float:
    """CPU µs per image of the bare loop, one image at a time (runs in its own process)."""
    run_one = bare_pipeline(model_tag, 1)
    blobs = [Path(f).read_bytes() for f in files]
    for blob in blobs[:4]:
        run_one(blob)  # warm
    started = time.process_time()
    for index in range(images):
        run_one(blobs[index % len(blobs)])
    return 1e6 * (time.process_time() - started) / images


def bare_cpu_us_in_subprocess(model_tag: str, files: Sequence[Path], images: int) -> float:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(bare_cpu_us, (model_tag, [str(f) for f in files], images))


# ----------------------------------------------------------------------------------------------------
# Load runs


@dataclass
class Run:
    server: str
    size: str
    mode: str
    in_flight: int
    answers: int
    cpu_us_per_request: float
    loop_us_per_request: float  # of which the event-loop threads
    result: WrkResult


def answers(result: WrkResult) -> int:
    """Every answer the server gave (errors cost CPU too)."""
    return result.ok + result.shed + result.client_errors + result.server_errors


def load_run(name: str, server: BentoServer, size: str, mode: str, inputs: Path, in_flight: int,
             seconds: float) -> Run:
    """A short warm-up, then one measured wrk run; CPU µs per answer from the server's process tree."""
    script = "upload.lua" if mode == "upload" else "url.lua"
    run_wrk(server.url, script, inputs, min(in_flight, 4), 1.0)
    before = tree_cpu(server.process.pid)
    result = run_wrk(server.url, script, inputs, in_flight, seconds)
    used = tree_cpu(server.process.pid) - before
    count = max(answers(result), 1)
    return Run(name, size, mode, in_flight, count, 1e6 * used.total / count, 1e6 * used.loop / count, result)


def format_run(run: Run) -> str:
    r = run.result
    return (f"| {run.server} | {run.size} | {run.mode} | {run.in_flight} | {run.answers} | "
            f"{run.cpu_us_per_request:.0f} | {run.loop_us_per_request:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
            f"{answers(r) - r.ok} |")


RUN_HEADER = ("| server | size | input | in flight | answers | CPU µs/request | of which event loop | p50 ms | p99 ms "
              "| non-2xx |\n|---|---|---|---|---|---|---|---|---|---|")


def summary(runs: Sequence[Run]) -> list[str]:
    """Median CPU µs per request for each server and load, over the rounds."""
    groups: dict[tuple[str, str, str, int], list[Run]] = collections.defaultdict(list)
    for run in runs:
        groups[run.server, run.size, run.mode, run.in_flight].append(run)
    lines = []
    for (server, size, mode, n), group in groups.items():
        total = [run.cpu_us_per_request for run in group]
        loop = [run.loop_us_per_request for run in group]
        lines.append(f"{server} {size} {mode} {n} in flight: median {statistics.median(total):.0f} CPU µs/request, "
                     f"event loop {statistics.median(loop):.0f} (runs: {', '.join(f'{v:.0f}' for v in total)})")
    return lines


# ----------------------------------------------------------------------------------------------------
# Profile: py-spy samples of the server, split into parts


# Samples whose innermost frame waits for work (a woken thread that has no CPU yet is sampled as active):
# no CPU to share out.
IDLE_LEAVES = frozenset({"Condition.wait", "Queue.get", "_worker", "Event.wait", "sleep"})

# A sample goes to the part of the first of its frames (leaf first) that a rule matches; rules are tried in this
# order on each frame: (part, words one of which the frame's "function (file)" text contains).
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model: ONNX Runtime + normalise", ("run_batch", "logits_for_pixels", "onnxruntime", "normalize_pixels")),
    ("upload: temp file write/read/cleanup", ("read_upload", "tempfile.py", "request_temp_dir", "TempfilePool",
                                              "FileSchema.decode", "unlink", "rmtree")),
    ("decode + preprocess (Pillow)", ("bytes_to_pixels", "decode_to_pixels", "/PIL/", "inference/decode.py",
                                      "inference/preprocess.py")),
    ("URL fetch (client side)", ("fetch_url", "inference/fetch.py", "http/client.py", "socket.py", "ssl.py")),
    ("multipart / form parsing", ("/multipart/", "formparsers.py", "MultipartSerde", "Request.form", "_get_form")),
    ("postprocess", ("inference/postprocess.py",)),
    ("pydantic: validate request / build answer", ("pydantic", "model_validate", "BaseModel.__init__")),
    ("JSON encode + response", ("model_dump_json", "serialize_model", "to_http_response", "/json/",
                                "starlette/responses.py", "service_error_response", "JSONSerde", "IterableResponse")),
    ("metrics (Prometheus)", ("prometheus_client", "serving/metrics.py", "instruments.py")),
    ("OpenTelemetry middleware", ("opentelemetry",)),
    ("access log (logging)", ("/logging/", "server/http/access.py")),
    ("our ASGI middlewares", ("serving/http_guards.py", "serving/api_keys.py")),
    ("BentoML/Starlette routing + middlewares", ("bentoml/_internal", "_bentoml_impl/server", "_bentoml_sdk",
                                                 "starlette/", "simple_di")),
    ("service handler (service.py, batcher)", ("RoomClassifier.", "service.py)", "serving/batching.py")),
    ("HTTP server (uvicorn + httptools)", ("uvicorn/protocols", "httptools")),
    ("anyio cancel scopes (request timeout, to_thread)", ("CancelScope", "move_on_after", "current_async_library",
                                                         "get_async_backend", "current_time")),
    ("thread hops: hand-over, wake-ups, futures", ("anyio/", "threading.py", "concurrent/futures", "queue.py")),
    ("uvloop (C): socket I/O, polling, callbacks, wake-ups", ("Runner.run",)),
    ("asyncio tasks + contextvars", ("asyncio/", "contextvars")),
)
# Helpers whose time belongs to their caller (Starlette's Headers, context managers, signatures, enums).
TRANSPARENT = ("starlette/datastructures.py", "/contextlib.py", "/inspect.py", "/enum.py", "/functools.py",
               "/typing.py", "/abc.py")
IDLE = "(waiting)"
ARBITER = "(bentoml serve's arbiter process)"
LOOP, THREADS = "event loop thread", "other threads"


def part_of(stack: Sequence[str]) -> str:
    leaf = stack[-1].split(" (")[0]
    if leaf in IDLE_LEAVES:
        return IDLE
    for frame in reversed(stack):  # leaf first
        if any(word in frame for word in TRANSPARENT):
            continue
        for part, words in PARTS:
            if any(word in frame for word in words):
                return part
    return "other"


def thread_of(stack: Sequence[str]) -> str:
    """Which thread took a sample: the arbiter, a worker's event loop (uvicorn's asyncio_run), or another."""
    if sum(frame.startswith("process ") for frame in stack) < 2:
        return ARBITER
    return LOOP if any(frame.startswith("asyncio_run (") for frame in stack) else THREADS


def read_collapsed(path: Path) -> dict[str, collections.Counter[str]]:
    """py-spy's raw format ('frame;frame;... count' per line) -> thread -> samples per part."""
    samples: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            frames = stack.split(";")
            samples[thread_of(frames)][part_of(frames)] += int(count)
    return samples


def profile_run(name: str, server: BentoServer, size: str, mode: str, inputs: Path, in_flight: int, seconds: float,
                out_dir: Path) -> tuple[Run, dict[str, collections.Counter[str]]]:
    """One load run with py-spy sampling the server tree. Python frames only: py-spy's native unwinding could not
    keep up on 2 loaded cores and lost samples in ONNX Runtime and Pillow."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"profile-{name.split(':')[0]}-{size}-{mode}-{in_flight}.txt"
    command = [py_spy, "record", "--pid", str(server.process.pid), "--subprocesses", "--nonblocking",
               "--full-filenames", "--nolineno", "--rate", "200", "--format", "raw", "--output", str(raw),
               "--duration", str(int(seconds) + 3)]
    log = raw.with_suffix(".log")
    with log.open("wb") as log_file:
        spy = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        time.sleep(1.0)  # py-spy attaches
        run = load_run(name, server, size, mode, inputs, in_flight, seconds)
    finally:
        spy.wait(timeout=seconds + 60)
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote no profile:\n{log.read_text(errors='replace')}")
    return run, read_collapsed(raw)


def format_profile(run: Run, samples: dict[str, collections.Counter[str]]) -> list[str]:
    """Each part's share of its thread group's working samples, as CPU µs per request: the event loop's from its
    measured CPU time, the other threads' from the rest."""
    cpu = {LOOP: run.loop_us_per_request, THREADS: run.cpu_us_per_request - run.loop_us_per_request}
    lines = [f"profile of {run.server}, {run.size} {run.mode} {run.in_flight} in flight: "
             f"{run.cpu_us_per_request:.0f} CPU µs/request, event loop thread {cpu[LOOP]:.0f}, "
             f"other threads and processes {cpu[THREADS]:.0f}",
             "| thread | part | share | CPU µs/request |", "|---|---|---|---|"]
    for thread in (LOOP, THREADS):
        working = collections.Counter({part: n for part, n in samples.get(thread, {}).items() if part != IDLE})
        total = sum(working.values()) or 1
        for part, count in working.most_common():
            lines.append(f"| {thread} | {part} | {100 * count / total:.1f} % | {cpu[thread] * count / total:.0f} |")
        lines.append(f"| {thread} | ({total} samples, {samples.get(thread, {}).get(IDLE, 0)} waiting) | | |")
    return lines


# ----------------------------------------------------------------------------------------------------
# The run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-tag", default="room_classifier:latest")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--quality", type=int, default=LISTING_QUALITY)
    parser.add_argument("--sizes", default="640x480,1600x1200")
    parser.add_argument("--modes", default="upload,url")
    parser.add_argument("--in-flight", default="32", help="comma-separated wrk connection counts")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measured wrk run")
    parser.add_argument("--rounds", type=int, default=1, help="runs per server and load, alternating servers")
    parser.add_argument("--against", type=Path, action="append", default=[],
                        help="another checkout's root to serve too (repeatable), e.g. an exported older commit")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the servers (repeatable)")
    parser.add_argument("--against-env", action="append", default=[],
                        help="NAME=VALUE for the --against servers only (repeatable): `--against . --against-env "
                             "RC_X=1` compares a setting")
    parser.add_argument("--bare-images", type=int, default=200, help="images of the bare loop per size (0: skip)")
    parser.add_argument("--profile", type=Path, help="folder for py-spy's raw profiles; prints the breakdown")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes, modes = args.sizes.split(","), args.modes.split(",")
    in_flight = [int(n) for n in args.in_flight.split(",")]
    env = {"RC_URL_ALLOWLIST": "127.0.0.1/32", "RC_MODEL_TAG": args.model_tag,
           **dict(item.split("=", 1) for item in args.env)}
    runs: list[Run] = []
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rc-cpu-")))
        files = benchmark_photos(args.data, args.photos, sizes, workdir, args.quality)
        inputs = request_lists(files, workdir, stack.enter_context(nginx_serving(workdir)))
        if args.bare_images:
            for size in sizes:
                bare_us = bare_cpu_us_in_subprocess(args.model_tag, files[size], args.bare_images)
                print(f"bare loop {size}: {bare_us:.0f} CPU µs/image", flush=True)
        servers = {"this": stack.enter_context(start_bento_server(env=env, cwd=REPO_ROOT))}
        against_env = {**env, **dict(item.split("=", 1) for item in args.against_env)}
        for index, root in enumerate(args.against):
            servers[f"against{index + 1}:{root.resolve().name}"] = stack.enter_context(
                start_bento_server(env=against_env, cwd=root.resolve()))
        print(RUN_HEADER, flush=True)
        for size in sizes:
            for mode in modes:
                for n in in_flight:
                    for _ in range(args.rounds):
                        for name, server in servers.items():
                            runs.append(load_run(name, server, size, mode, inputs[size, mode], n, args.seconds))
                            print(format_run(runs[-1]), flush=True)
        for line in summary(runs):
            print(line)
        if args.profile:
            for size in sizes:
                for mode in modes:
                    for n in in_flight:
                        for name, server in servers.items():
                            run, samples = profile_run(name, server, size, mode, inputs[size, mode], n, args.seconds,
                                                       args.profile)
                            print("\n".join(format_profile(run, samples)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
