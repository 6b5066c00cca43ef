"""Throughput and latency of the running service under concurrent clients, adaptive batching on and off.

Each client is a thread with its own `bentoml.SyncHTTPClient` uploading real room photos from the shared
data (`extra/`), re-encoded as JPEGs at realistic sizes (640x480 and 1600x1200 by default) in a temporary
folder. A run stops after `--requests` requests or `--max-seconds`, whichever comes first. Reports
images/s, p50/p95/p99 latency per request, errors, and the mean batch size BentoML's /metrics saw.

By default the command starts `bentoml serve` itself (loopback, free port) twice: with the service's
own RC_MAX_BATCH_SIZE (batching on) and with RC_MAX_BATCH_SIZE=1 (off). `--url` measures an already
running service (a container, say) as it is configured, once.

    python -m benchmarks.bench_service                       # model: room_classifier:latest of BENTOML_HOME
    python -m benchmarks.bench_service --tiny-model          # tiny test model in a temporary BENTOML_HOME
    python -m benchmarks.bench_service --model-home /path/to/bentoml_home   # a copy of its room_classifier
    python -m benchmarks.bench_service --url http://127.0.0.1:3000 --clients 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import bentoml
import requests
from tqdm import tqdm

from benchmarks.client_calls import classify_uploads, error_code_of
from benchmarks.common import (DEFAULT_DATA, DEFAULT_SERVICE, BentoServer, find_room_photos, parse_size,
                               percentiles_ms, read_batch_stats, require_loopback_url, write_jpegs)
from benchmarks.model_home import temporary_model_home


@dataclass
class RunResult:
    """One (batching mode, image size) measurement."""

    mode: str
    size: str
    clients: int
    images_per_request: int
    requests: int
    ok: int
    errors: dict[str, int]
    seconds: float
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch_size: float


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="measure this running service instead of starting one (loopback only)")
    parser.add_argument("--service", default=DEFAULT_SERVICE,
                        help="what `bentoml serve` runs (import string or bento tag)")
    parser.add_argument("--tiny-model", action="store_true",
                        help="serve the tiny test model from a temporary BENTOML_HOME (no trained model needed)")
    parser.add_argument("--model-home", help="serve a copy of room_classifier:latest from this BentoML home "
                        "(copied into a temporary home; default: the model of the current BENTOML_HOME)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="shared data folder with extra/<source>/<class>/")
    parser.add_argument("--photos", type=int, default=48, help="distinct photos to cycle through")
    parser.add_argument("--sizes", default="640x480,1600x1200", help="comma-separated WxH JPEG sizes")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--requests", type=int, default=400, help="requests per run (upper bound)")
    parser.add_argument("--max-seconds", type=float, default=45.0, help="time per run (upper bound)")
    parser.add_argument("--warmup", type=int, default=16, help="requests before each run, not measured")
    parser.add_argument("--modes", default="on,off", help="batching modes to run when starting the server")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--plot", type=Path, help="also draw images/s and p95 per run into this PNG")
    args = parser.parse_args(argv)
    require_loopback_url(parser, args.url)
    return args


def run_load(url: str, files: Sequence[Path], clients: int, images_per_request: int, max_requests: int,
             max_seconds: float, label: str) -> tuple[list[float], Counter, float]:
    """Send up to `max_requests` upload requests from `clients` threads; return latencies, outcomes, wall time."""
    lock = threading.Lock()
    next_index = [0]
    latencies: list[float] = []
    outcomes: Counter = Counter()
    deadline = time.monotonic() + max_seconds
    progress = tqdm(total=max_requests, desc=label, unit="req", leave=False, file=sys.stderr)

    def take_request() -> int | None:
        with lock:
            if next_index[0] >= max_requests or time.monotonic() >= deadline:
                return None
            next_index[0] += 1
            return next_index[0] - 1

    def client_loop() -> None:
        with bentoml.SyncHTTPClient(url, timeout=120) as client:
            while (index := take_request()) is not None:
                batch = [files[(index * images_per_request + k) % len(files)] for k in range(images_per_request)]
                start = time.perf_counter()
                try:
                    classify_uploads(client, batch)
                    outcome = "ok"
                except Exception as exc:  # every failure is counted by kind, none stops the run
                    outcome = error_code_of(exc)
                elapsed = time.perf_counter() - start
                with lock:
                    outcomes[outcome] += 1
                    if outcome == "ok":
                        latencies.append(elapsed)
                    progress.update(1)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    progress.close()
    return latencies, outcomes, time.perf_counter() - started


def measure(url: str, mode: str, size: str, files: Sequence[Path], args: argparse.Namespace) -> RunResult:
    """Warm up, then one measured run against `url`."""
    label = f"batching {mode}, {size}"
    run_load(url, files, min(args.clients, 4), args.images_per_request, args.warmup, 60.0, f"warm-up {label}")
    before = read_batch_stats(url)
    latencies, outcomes, seconds = run_load(url, files, args.clients, args.images_per_request,
                                            args.requests, args.max_seconds, label)
    batches = read_batch_stats(url).minus(before)
    stats = percentiles_ms(latencies)
    ok = outcomes.pop("ok", 0)
    return RunResult(mode=mode, size=size, clients=args.clients, images_per_request=args.images_per_request,
                     requests=ok + sum(outcomes.values()), ok=ok, errors=dict(outcomes), seconds=round(seconds, 2),
                     images_per_s=round(ok * args.images_per_request / seconds, 2),
                     p50_ms=round(stats["p50"], 1), p95_ms=round(stats["p95"], 1), p99_ms=round(stats["p99"], 1),
                     mean_batch_size=round(batches.mean_batch_size, 2))


def server_for_mode(mode: str, args: argparse.Namespace, env: dict[str, str]):
    """A started server for a batching mode, or the --url service as it is."""
    if args.url:
        return nullcontext(args.url)
    mode_env = {**env, "RC_MAX_BATCH_SIZE": "1"} if mode == "off" else dict(env)
    return BentoServer(args.service, env=mode_env)


def describe_model(url: str) -> str:
    """'room_classifier:<version> (architecture)' as the service's /health reports it."""
    try:
        health = requests.get(f"{url}/health", timeout=10).json()
    except (requests.RequestException, ValueError) as exc:
        return f"model unknown ({type(exc).__name__})"
    return f"{health.get('model')} ({health.get('architecture')})"


def format_table(results: Sequence[RunResult]) -> str:
    header = (f"{'batching':<14}{'size':>11}{'clients':>8}{'img/req':>8}{'requests':>9}{'errors':>7}"
              f"{'images/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'mean batch':>11}")
    rows = [header, "-" * len(header)]
    for r in results:
        rows.append(f"{r.mode:<14}{r.size:>11}{r.clients:>8}{r.images_per_request:>8}{r.requests:>9}"
                    f"{sum(r.errors.values()):>7}{r.images_per_s:>10.2f}{r.p50_ms:>9.1f}{r.p95_ms:>9.1f}"
                    f"{r.p99_ms:>9.1f}{format_batch(r.mean_batch_size):>11}")
    return "\n".join(rows)


def format_batch(mean_batch_size: float) -> str:
    """'-' when BentoML recorded no batches (batching off)."""
    return "-" if math.isnan(mean_batch_size) else f"{mean_batch_size:.2f}"


def plot_results(results: Sequence[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.mode}\n{r.size}" for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(labels, [r.images_per_s for r in results], color="tab:blue")
    left.set_title("throughput (images/s)")
    right.bar(labels, [r.p95_ms for r in results], color="tab:orange", label="p95")
    right.scatter(labels, [r.p50_ms for r in results], color="black", zorder=3, label="p50")
    right.set_title("latency per request (ms)")
    right.legend()
    fig.suptitle(f"room classifier: {results[0].clients} clients, batching on vs off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [parse_size(text) for text in args.sizes.split(",")]
    modes = ["as-configured"] if args.url else [m.strip() for m in args.modes.split(",")]
    results: list[RunResult] = []
    load_before = os.getloadavg()[0]
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rc-bench-")))
        env: dict[str, str] = {}
        if (args.tiny_model or args.model_home) and not args.url:
            env["BENTOML_HOME"] = stack.enter_context(temporary_model_home(args.model_home))
        photos = find_room_photos(args.data, args.photos)
        files_by_size = {f"{w}x{h}": write_jpegs(photos, (w, h), workdir / f"{w}x{h}") for w, h in sizes}
        print(f"{len(photos)} photos from {args.data}, sizes {', '.join(files_by_size)}; "
              f"model home: {env.get('BENTOML_HOME', os.environ.get('BENTOML_HOME', 'default'))}", file=sys.stderr)
        for mode in modes:
            with server_for_mode(mode, args, env) as server:
                url = server if isinstance(server, str) else server.url
                print(f"batching {mode}: {describe_model(url)}", file=sys.stderr)
                for size, files in files_by_size.items():
                    results.append(measure(url, mode, size, files, args))
                    print(format_table(results[-1:]).splitlines()[-1], file=sys.stderr)
    print(format_table(results))
    print(f"load average (1 min) of this shared machine: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    if args.json:
        rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(r).items()}
                for r in results]
        args.json.write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot_results(results, args.plot)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
