"""Serving speed against the bare model, in one run: `wrk` drives the service, the bare loop sets the limit.

The photos are real listing-style room photos: 64 from `../shared/data/extra` (the House Rooms real-estate
listing photos, 416x416, and Places365 room photos, 256x256; the four rooms in turn), each cropped to 4:3 and
re-encoded as a baseline JPEG at quality 85 with 4:2:0 chroma (what listing sites and phones typically send;
`--quality`) at 640x480 and 1600x1200 (`--sizes`). The sources are smaller than 1600x1200, so the large size
is upscaled: smoother, hence fewer bytes, than a camera photo of that size, but decoded through the same path
(Pillow's draft mode reads it at 1/4 scale).

For each photo size it measures:

- the bare in-process limit: `inference/` decode + preprocess + ONNX Runtime + postprocess in a plain loop,
  one process per core (images/s), and one process, one image at a time (ms/image);
- the service (`bentoml serve`, this repo's service) under `wrk` keeping N requests in flight, for uploads
  (multipart) and for JSON `image_url`s served by nginx on 127.0.0.1: requests/s, its ratio to the bare
  limit, p50/p99 latency, non-2xx answers, and the CPU share `wrk` itself took (it shares the cores);
- the mean time per serving stage that the service records in /metrics (`rc_stage_seconds`);
- optionally batching off (RC_MAX_BATCH_SIZE=1) at 1 and 8 in flight, and an overload run: 64 connections
  that ignore Retry-After, goodput compared with the 32-in-flight throughput;
- cold start: `bentoml serve` start to /readyz 200.

Speed is reported as ratios measured in the same run: absolute numbers move with the machine and with
whatever else runs on it.

    python -m benchmarks.speed                             # model: room_classifier:latest of BENTOML_HOME
    python -m benchmarks.speed --tiny-model --seconds 5    # smoke run with the tiny test model
    python -m benchmarks.speed --batching-off --overload --json artifacts/speed.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import requests

from benchmarks.common import parse_size
from testkit.image_host import nginx_serving
from testkit.model_home import temporary_model_home
from testkit.photos import DEFAULT_DATA, find_room_photos, write_jpegs
from testkit.server import DEFAULT_SERVICE, start_bento_server

WRK_DIR = Path(__file__).resolve().parent / "wrk"
STAGE_METRIC = re.compile(r'^rc_stage_seconds_(sum|count)\{([^}]*)\}\s+([0-9.eE+-]+)$')


LISTING_QUALITY = 85  # a typical listing-site / phone JPEG quality


def benchmark_photos(data: Path, count: int, sizes: Sequence[str], out_dir: Path,
                     quality: int = LISTING_QUALITY) -> dict[str, list[Path]]:
    """size -> the same `count` real room photos (`../shared/data/extra`) re-encoded at that size, in
    `out_dir/<size>/`."""
    photos = find_room_photos(data, count)
    return {size: write_jpegs(photos, parse_size(size), out_dir / size, quality=quality) for size in sizes}


# ----------------------------------------------------------------------------------------------------
# The bare limit: inference/ in a plain loop, no HTTP, no second process


def bare_worker(model_tag: str, files: Sequence[str], seconds: float, ort_threads: int) -> tuple[int, float]:
    """Classify `files` round and round for `seconds`; return (images, elapsed). Runs in its own process."""
    run_one = bare_pipeline(model_tag, ort_threads)
    blobs = [Path(f).read_bytes() for f in files]
    run_one(blobs[0])  # warm
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run_one(blobs[count % len(blobs)])
        count += 1
    return count, time.perf_counter() - start


def bare_pipeline(model_tag: str, ort_threads: int):
    """The service's per-image steps, in-process: bytes -> pixels -> logits -> prediction."""
    import bentoml

    from inference.model import OnnxClassifier
    from inference.postprocess import postprocess
    from inference.preprocess import bytes_to_pixels
    from serving.config import ServiceConfig

    config = ServiceConfig.from_env({})
    classifier = OnnxClassifier.from_bento_model(bentoml.models.get(model_tag), intra_op_threads=ort_threads)
    info = classifier.info

    def run_one(blob: bytes):
        pixels = bytes_to_pixels(blob, info.preprocessing, config.image_limits())
        return postprocess(classifier.logits_for_pixels(pixels[None]), info.labels, info.temperature,
                           config.default_top_k, config.uncertain_threshold)

    return run_one


def bare_throughput(model_tag: str, files: Sequence[Path], processes: int, seconds: float) -> float:
    """Images/s of `processes` bare loops in parallel (one ONNX Runtime thread each)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        results = pool.starmap(bare_worker, [(model_tag, [str(f) for f in files], seconds, 1)] * processes)
    return sum(count / elapsed for count, elapsed in results)


def bare_latency_ms(model_tag: str, files: Sequence[Path], seconds: float, ort_threads: int) -> float:
    """Mean ms per image of one bare loop, one image at a time (in a fresh process, like the service's)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        count, elapsed = pool.apply(bare_worker, (model_tag, [str(f) for f in files], seconds, ort_threads))
    return 1000.0 * elapsed / count


# ----------------------------------------------------------------------------------------------------
# wrk as the load generator (the image host is testkit.image_host.nginx_serving)


@dataclass
class WrkResult:
    requests_per_s: float
    ok: int
    shed: int
    client_errors: int
    server_errors: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    wrk_cpu_share: float  # of the whole machine (all cores)


def run_wrk(url: str, script: str, inputs_list: Path, connections: int, seconds: float,
            path: str = "/classify") -> WrkResult:
    """One wrk run with one thread (so it takes as little CPU as it can); its CPU time from wait4."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    command = [wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s",
               "-s", str(WRK_DIR / script), url, "--", str(inputs_list), path]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = time.perf_counter()
    output = process.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    line = next((line for line in output.splitlines() if line.startswith("WRK_JSON ")), None)
    if process.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({process.returncode}):\n{output}")
    data = json.loads(line[len("WRK_JSON "):])
    return WrkResult(requests_per_s=data["ok"] / (data["duration_us"] / 1e6), ok=data["ok"], shed=data["shed"],
                     client_errors=data["client_error"], server_errors=data["server_error"],
                     socket_errors=data["socket_errors"] + data["timeouts"],
                     p50_ms=data["p50_us"] / 1000.0, p99_ms=data["p99_us"] / 1000.0,
                     wrk_cpu_share=(usage.ru_utime + usage.ru_stime) / wall / os.cpu_count())


# ----------------------------------------------------------------------------------------------------
# Stage times the service records


def read_stage_totals(url: str) -> dict[str, tuple[float, float]]:
    """stage -> (seconds, count) summed over the service's processes, from /metrics."""
    totals: dict[str, list[float]] = {}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        match = STAGE_METRIC.match(line)
        if match:
            kind, labels, value = match.groups()
            stage = re.search(r'stage="([^"]+)"', labels)
            if stage:
                entry = totals.setdefault(stage.group(1), [0.0, 0.0])
                entry[0 if kind == "sum" else 1] += float(value)
    return {stage: (values[0], values[1]) for stage, values in totals.items()}


def stage_means_ms(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    means = {}
    for stage, (seconds, count) in after.items():
        seconds0, count0 = before.get(stage, (0.0, 0.0))
        if count > count0:
            means[stage] = round(1000.0 * (seconds - seconds0) / (count - count0), 2)
    return means


# ----------------------------------------------------------------------------------------------------
# The run


@dataclass
class Row:
    size: str
    mode: str  # upload | url
    in_flight: int
    batching: str  # on | off
    result: WrkResult
    bare_images_per_s: float
    bare_ms_per_image: float
    stages_ms: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.result.requests_per_s / self.bare_images_per_s


def measure(url: str, row_key: tuple[str, str, int, str], lists: dict[tuple[str, str], Path], seconds: float,
            bare: dict[str, tuple[float, float]]) -> Row:
    size, mode, in_flight, batching = row_key
    script = "upload.lua" if mode == "upload" else "url.lua"
    run_wrk(url, script, lists[size, mode], min(in_flight, 4), 2.0)  # warm-up: connections, caches
    before = read_stage_totals(url)
    result = run_wrk(url, script, lists[size, mode], in_flight, seconds)
    row = Row(size, mode, in_flight, batching, result, *bare[size],
              stages_ms=stage_means_ms(before, read_stage_totals(url)))
    print(format_row(row), file=sys.stderr)
    return row


def format_row(row: Row) -> str:
    r = row.result
    errors = r.shed + r.client_errors + r.server_errors + r.socket_errors
    return (f"| {row.size} | {row.in_flight} | {row.mode} | {row.batching} | {r.requests_per_s:.1f} | "
            f"{100 * row.ratio:.0f} % | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {errors} | {100 * r.wrk_cpu_share:.0f} % |")


TABLE_HEADER = ("| size | in flight | input | batching | service req/s | of bare limit | p50 ms | p99 ms | "
                "non-2xx | wrk CPU |\n|---|---|---|---|---|---|---|---|---|---|")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--service", default=DEFAULT_SERVICE)
    parser.add_argument("--model-tag", default="room_classifier:latest")
    parser.add_argument("--tiny-model", action="store_true", help="serve the tiny test model (smoke runs)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--sizes", default="640x480,1600x1200")
    parser.add_argument("--quality", type=int, default=LISTING_QUALITY, help="JPEG quality of the re-encoded photos")
    parser.add_argument("--in-flight", default="32,1", help="comma-separated wrk connection counts")
    parser.add_argument("--modes", default="upload,url")
    parser.add_argument("--seconds", type=float, default=20.0, help="per wrk run")
    parser.add_argument("--batching-off", action="store_true", help="also 1 and 8 in flight with batching off")
    parser.add_argument("--overload", action="store_true",
                        help="also many connections ignoring Retry-After (see --overload-connections)")
    parser.add_argument("--overload-connections", default="64,256",
                        help="64: the issue's test (within the admission line); 256: far beyond it (refusals)")
    parser.add_argument("--overload-seconds", type=float, default=60.0)
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def request_lists(files: dict[str, list[Path]], workdir: Path, host: str) -> dict[tuple[str, str], Path]:
    """wrk's inputs per (size, mode): the photo files to upload, and their URLs on the loopback nginx `host`."""
    lists: dict[tuple[str, str], Path] = {}
    for size, paths in files.items():
        lists[size, "upload"] = workdir / f"{size}.files"
        lists[size, "upload"].write_text("\n".join(str(path) for path in paths))
        lists[size, "url"] = workdir / f"{size}.urls"
        lists[size, "url"].write_text("\n".join(f"{host}/{size}/{path.name}" for path in paths))
    return lists


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop servers and nginx on the way out
    sizes = [f"{w}x{h}" for w, h in (parse_size(text) for text in args.sizes.split(","))]
    modes = args.modes.split(",")
    in_flight = [int(n) for n in args.in_flight.split(",")]
    cores = os.cpu_count() or 1
    report: dict = {"cores": cores, "load_before": os.getloadavg()[0]}
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rc-speed-")))
        home = stack.enter_context(temporary_model_home(None if args.tiny_model else os.environ.get(
            "BENTOML_HOME", str(Path.home() / "bentoml")), tag=args.model_tag))
        os.environ["BENTOML_HOME"] = home  # the bare loops (spawned) read the same model copy
        files = benchmark_photos(args.data, args.photos, sizes, workdir, args.quality)
        lists = request_lists(files, workdir, stack.enter_context(nginx_serving(workdir)))

        bare = {size: (bare_throughput(args.model_tag, files[size], cores, args.seconds / 2),
                       bare_latency_ms(args.model_tag, files[size], args.seconds / 4, 1)) for size in sizes}
        for size, (images_per_s, ms) in bare.items():
            print(f"bare limit {size}: {images_per_s:.1f} images/s on {cores} processes, {ms:.2f} ms/image",
                  file=sys.stderr)
        report["bare"] = {size: {"images_per_s": v[0], "ms_per_image": v[1]} for size, v in bare.items()}

        env = {"BENTOML_HOME": home, "RC_URL_ALLOWLIST": "127.0.0.1/32",
               "RC_MODEL_TAG": "room_classifier:latest" if args.tiny_model else args.model_tag}
        rows: list[Row] = []
        started = time.perf_counter()
        with start_bento_server(args.service, env=env) as server:
            report["cold_start_s"] = round(time.perf_counter() - started, 2)
            print(f"service ready in {report['cold_start_s']} s", file=sys.stderr)
            for size in sizes:
                for mode in modes:
                    for n in in_flight:
                        rows.append(measure(server.url, (size, mode, n, "on"), lists, args.seconds, bare))
            if args.batching_off:
                for size in sizes:
                    for n in (1, 8):
                        rows.append(measure(server.url, (size, "upload", n, "on"), lists, args.seconds, bare))
            if args.overload:
                report["overload"] = [overload(server.url, lists, sizes[-1], rows, int(n), args.overload_seconds)
                                      for n in args.overload_connections.split(",")]
        if args.batching_off:
            with start_bento_server(args.service, env={**env, "RC_MAX_BATCH_SIZE": "1"}) as server:
                for size in sizes:
                    for n in (1, 8):
                        rows.append(measure(server.url, (size, "upload", n, "off"), lists, args.seconds, bare))

    print(TABLE_HEADER)
    for row in rows:
        print(format_row(row))
    print("\nmean ms per stage (server side):")
    for row in rows:
        print(f"  {row.size} {row.mode} {row.in_flight} in flight, batching {row.batching}: {row.stages_ms}")
    for size, (images_per_s, ms) in bare.items():
        print(f"bare limit {size}: {images_per_s:.1f} images/s ({cores} processes), {ms:.2f} ms/image (1 process)")
    print(f"cold start (bentoml serve to /readyz 200): {report['cold_start_s']} s")
    for summary in report.get("overload", []):
        print("overload:", json.dumps(summary))
    report["load_after"] = os.getloadavg()[0]
    print(f"load average (1 min): {report['load_before']:.2f} before, {report['load_after']:.2f} after")
    if args.json:
        report["rows"] = [{**asdict(row), "ratio": row.ratio} for row in rows]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(row.result.server_errors == 0 and row.result.socket_errors == 0 for row in rows) else 1


def overload(url: str, lists: dict[tuple[str, str], Path], size: str, rows: Sequence[Row], connections: int,
             seconds: float) -> dict:
    """`connections` clients that never back off: goodput against the 32-in-flight upload throughput."""
    reference = next((r.result.requests_per_s for r in rows
                      if r.size == size and r.mode == "upload" and r.in_flight == 32), math.nan)
    result = run_wrk(url, "upload.lua", lists[size, "upload"], connections, seconds)
    summary = {"size": size, "connections": connections, "seconds": seconds,
               "goodput_per_s": round(result.requests_per_s, 1),
               "of_32_in_flight": round(result.requests_per_s / reference, 3), "ok": result.ok,
               "shed_429_503": result.shed, "server_errors": result.server_errors,
               "socket_errors": result.socket_errors, "p99_ms": result.p99_ms}
    print(f"overload: {summary}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    sys.exit(main())
