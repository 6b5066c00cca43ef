"""Soak the service: many concurrent clients for a while, good and bad requests mixed, on loopback only.

Every request has a kind (a good upload, a good URL, a multi-image request with one bad image, a truncated
JPEG, a header claiming 100000x100000 pixels, a text file named .jpg, malformed JSON, a hostile URL) and
the outcomes that kind may legitimately get. Load shedding (429 overloaded, 503 model_overloaded) is
counted on its own (a client told to back off waits --backoff seconds, 1 s like the service's Retry-After,
or hammers on with --backoff 0); anything else outside the expected set is an *unexpected error*: a 5xx, a good image
refused, a bad one accepted, a 4xx without the JSON error envelope, a dropped connection or a timeout.
The report shows outcomes per kind, latency percentiles and the server's memory (RSS of its process
tree) at the start, the peak and the end. Exit status 1 when there was any unexpected error.

    python -m benchmarks.soak --tiny-model                      # 64 clients, 60 s, own `bentoml serve`
    python -m benchmarks.soak --url http://127.0.0.1:3000 --pid <server pid> --clients 32 --seconds 30

With `--url` the target must trust 127.0.0.1 for URL inputs (RC_URL_ALLOWLIST=127.0.0.1/32) for the
good-URL requests to succeed; the command's own server is started that way.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import bentoml
import requests
from tqdm import tqdm

from benchmarks.client_calls import classify_uploads, classify_url, error_code_from_body, error_code_of
from benchmarks.common import percentiles_ms, require_loopback_url
from testkit.image_host import ImageHost, serving_images
from testkit.images import png_with_huge_header, truncated
from testkit.model_home import temporary_model_home
from testkit.photos import DEFAULT_DATA, find_room_photos, write_jpegs
from testkit.server import DEFAULT_SERVICE, process_tree_rss, start_bento_server

SHED = {"429 overloaded", "503 model_overloaded", "429", "503"}
# Refused before any connection is made, and all of them point at this machine anyway.
HOSTILE_URLS = (
    "file:///etc/passwd", "gopher://127.0.0.1:70/_x", "ftp://127.0.0.1/x.jpg", "http://127.0.0.2:9/x.jpg",
    "http://[::1]:9/x.jpg", "http://[::ffff:127.0.0.2]:9/x.jpg", "http://0x7f000002:9/x.jpg",
    "http://2130706434:9/x.jpg", "http://0177.0.0.2:9/x.jpg", "http://0.0.0.0:9/x.jpg", "not a url",
)


# ----------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Inputs:
    good_files: list[Path]
    truncated: Path
    huge_dimensions: Path
    not_image: Path
    good_urls: list[str]
    redirect_to_private: str  # a redirect from the trusted image host to a loopback address that is not trusted


def make_inputs(good: Sequence[Path], workdir: Path, host: ImageHost) -> Inputs:
    """The bad files next to the good 640x480 JPEGs, and the URLs of the good ones on `host` (as 127.0.0.1,
    the address the soaked service trusts)."""
    broken = workdir / "truncated.jpg"
    broken.write_bytes(truncated(good[0].read_bytes(), 0.6))
    huge = workdir / "huge_dimensions.png"
    huge.write_bytes(png_with_huge_header(100_000, 100_000))
    not_image = workdir / "notes.jpg"
    not_image.write_bytes(b"this is a text file with a .jpg name\n" * 20)
    urls = [host.add(path.name, path.read_bytes(), host="127.0.0.1") for path in good]
    redirect = host.url("/redirect?to=http://127.0.0.2:9/x.jpg", host="127.0.0.1")
    return Inputs(list(good), broken, huge, not_image, urls, redirect)


# ----------------------------------------------------------------------------------------------------
# Request kinds: what to send, and which outcomes are fine


@dataclass(frozen=True)
class Kind:
    name: str
    weight: int
    expected: frozenset[str]  # outcome strings ("200", "422 corrupt_image", ...) besides load shedding
    send: Callable[["Worker"], str]


class Worker:
    """One client thread's connections and random choices."""

    def __init__(self, url: str, inputs: Inputs, seed: int) -> None:
        self.url, self.inputs, self.rng = url, inputs, random.Random(seed)
        self.client = bentoml.SyncHTTPClient(url, timeout=60)
        self.detail = ""  # the last failure's text, kept for the report's examples

    def close(self) -> None:
        self.client.close()

    def failed(self, exc: Exception) -> str:
        self.detail = repr(exc)[:300]
        return error_code_of(exc)

    def call(self, function: Callable[[], object]) -> str:
        try:
            function()
            return "200"
        except Exception as exc:  # the outcome is the report's business, not the thread's
            return self.failed(exc)

    def good_file(self) -> Path:
        return self.rng.choice(self.inputs.good_files)

    def mixed_batch(self) -> str:
        """Two good uploads, a truncated one, a good URL and a hostile one: answers must match per image."""
        try:
            answer = self.client.classify_batch(
                images=[self.good_file(), self.inputs.truncated, self.good_file()],
                image_urls=[self.rng.choice(self.inputs.good_urls), self.rng.choice(HOSTILE_URLS)])
        except Exception as exc:
            return self.failed(exc)
        results = answer["results"] if isinstance(answer, dict) else [r.model_dump() for r in answer.results]
        ok = [item.get("result") is not None for item in results]
        # order: image_urls first (good, hostile), then images (good, truncated, good)
        return "200" if ok == [True, False, True, False, True] else f"200 wrong_items {ok}"

    def raw_post(self, body: bytes, content_type: str) -> str:
        """What the generated client cannot send: a malformed body. A fresh connection each time, so a
        connection error is the server's doing, not a keep-alive connection that timed out meanwhile."""
        try:
            response = requests.post(f"{self.url}/classify", data=body, timeout=60,
                                     headers={"Content-Type": content_type, "Connection": "close"})
        except requests.RequestException as exc:
            return self.failed(exc)
        if response.ok:
            return str(response.status_code)
        code = error_code_from_body(response.text)
        return f"{response.status_code} {code}" if code else str(response.status_code)


def any_4xx_refusal(outcome: str) -> bool:
    """A 4xx that carries the service's error envelope (status and code)."""
    parts = outcome.split(" ")
    return len(parts) == 2 and parts[0].isdigit() and 400 <= int(parts[0]) < 500


KINDS = (
    Kind("upload_good", 35, frozenset({"200"}), lambda w: w.call(lambda: classify_uploads(w.client, [w.good_file()]))),
    Kind("url_good", 10, frozenset({"200"}),
         lambda w: w.call(lambda: classify_url(w.client, w.rng.choice(w.inputs.good_urls)))),
    Kind("batch_mixed", 10, frozenset({"200"}), lambda w: w.mixed_batch()),
    Kind("upload_truncated", 7, frozenset({"422 corrupt_image"}),
         lambda w: w.call(lambda: classify_uploads(w.client, [w.inputs.truncated]))),
    Kind("upload_huge_dimensions", 7, frozenset({"413 image_too_many_pixels"}),
         lambda w: w.call(lambda: classify_uploads(w.client, [w.inputs.huge_dimensions]))),
    Kind("upload_not_image", 7, frozenset({"415 not_an_image"}),
         lambda w: w.call(lambda: classify_uploads(w.client, [w.inputs.not_image]))),
    Kind("bad_json", 7, frozenset({"400 invalid_request"}),
         lambda w: w.raw_post(b'{"image_url": "http://127.0.0.1/x.jpg"', "application/json")),
    Kind("hostile_url", 10, frozenset(),  # any 4xx with a code: which one depends on the URL
         lambda w: w.call(lambda: classify_url(w.client, w.rng.choice(HOSTILE_URLS)))),
    Kind("redirect_to_private", 7, frozenset({"403 url_host_not_allowed"}),
         lambda w: w.call(lambda: classify_url(w.client, w.inputs.redirect_to_private))),
)


def judge(kind: Kind, outcome: str) -> str:
    """'expected', 'shed' or 'unexpected'."""
    if outcome in SHED:
        return "shed"
    if outcome in kind.expected or (kind.name == "hostile_url" and any_4xx_refusal(outcome)):
        return "expected"
    return "unexpected"


# ----------------------------------------------------------------------------------------------------
# The run


@dataclass
class Record:
    kind: str
    outcome: str
    verdict: str
    started: float
    seconds: float
    detail: str = ""


def soak(url: str, inputs: Inputs, clients: int, seconds: float, rss: Callable[[], int],
         backoff_s: float) -> tuple[list[Record], list[tuple[float, int]]]:
    """Run `clients` threads until `seconds` have passed; sample server RSS every second.

    A client told to back off (429/503) waits `backoff_s`, as a client honouring Retry-After would."""
    weights = [kind.weight for kind in KINDS]
    records: list[Record] = []
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + seconds
    stop_sampling = threading.Event()
    rss_samples: list[tuple[float, int]] = [(0.0, rss())]
    progress = tqdm(total=int(seconds), desc=f"{clients} clients", unit="s", file=sys.stderr)

    def sample_rss() -> None:
        while not stop_sampling.wait(1.0):
            rss_samples.append((time.monotonic() - start, rss()))
            progress.n = min(int(time.monotonic() - start), int(seconds))
            progress.set_postfix(requests=len(records), refresh=True)

    def client_loop(seed: int) -> None:
        worker = Worker(url, inputs, seed)
        try:
            while time.monotonic() < deadline:
                kind = worker.rng.choices(KINDS, weights)[0]
                began, worker.detail = time.perf_counter(), ""
                outcome = kind.send(worker)
                record = Record(kind.name, outcome, judge(kind, outcome), time.monotonic() - start,
                                time.perf_counter() - began, worker.detail)
                with lock:
                    records.append(record)
                if record.verdict == "shed" and backoff_s > 0:
                    time.sleep(backoff_s)
        finally:
            worker.close()

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client_loop, args=(seed,), daemon=True) for seed in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop_sampling.set()
    sampler.join()
    rss_samples.append((time.monotonic() - start, rss()))
    progress.close()
    return records, rss_samples


def report(records: Sequence[Record], rss_samples: Sequence[tuple[float, int]], seconds: float) -> dict:
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        by_kind[record.kind][record.outcome] += 1
    verdicts = Counter(record.verdict for record in records)
    rss_values = [value for _, value in rss_samples]
    return {
        "load_average_1min": round(os.getloadavg()[0], 2),
        "requests": len(records), "seconds": round(seconds, 1), "requests_per_s": round(len(records) / seconds, 1),
        "verdicts": dict(verdicts),
        "unexpected": dict(Counter(f"{r.kind}: {r.outcome}" for r in records if r.verdict == "unexpected")),
        "unexpected_examples": {f"{r.kind}: {r.outcome}": r.detail for r in records if r.verdict == "unexpected"},
        "outcomes_by_kind": {kind: dict(counter.most_common()) for kind, counter in sorted(by_kind.items())},
        "latency_ms_all": {k: round(v, 1) for k, v in percentiles_ms([r.seconds for r in records]).items()},
        "latency_ms_good_answered": {k: round(v, 1) for k, v in percentiles_ms(
            [r.seconds for r in records if r.kind in ("upload_good", "url_good") and r.outcome == "200"]).items()},
        "rss_mib": {"start": mib(rss_values[0]), "peak": mib(max(rss_values)), "end": mib(rss_values[-1]),
                    "growth": mib(rss_values[-1] - rss_values[0]), **half_peaks_mib(rss_samples),
                    "samples": [[round(t, 1), mib(v)] for t, v in rss_samples]} if rss_values[0] else None,
    }


def half_peaks_mib(samples: Sequence[tuple[float, int]]) -> dict[str, float]:
    """Peak RSS in the first and the second half of the soak. Memory is bounded when the second peak is
    not above the first by much (RSS saws up and down as allocators grow and return memory)."""
    middle = samples[-1][0] / 2
    first = [v for t, v in samples if t < middle] or [0]
    second = [v for t, v in samples if t >= middle] or [0]
    return {"peak_first_half": mib(max(first)), "peak_second_half": mib(max(second))}


def mib(value: int) -> float:
    return round(value / 2**20, 1)


def format_report(summary: dict) -> str:
    lines = [f"{summary['requests']} requests in {summary['seconds']} s ({summary['requests_per_s']} req/s); "
             f"verdicts: {summary['verdicts']}"]
    lines.append(f"{'kind':<24}outcomes")
    for kind, outcomes in summary["outcomes_by_kind"].items():
        lines.append(f"{kind:<24}" + ", ".join(f"{outcome}: {count}" for outcome, count in outcomes.items()))
    lines.append("latency ms, all requests:      " + _fmt(summary["latency_ms_all"]))
    lines.append("latency ms, good & answered:   " + _fmt(summary["latency_ms_good_answered"]))
    if summary["rss_mib"]:
        rss = summary["rss_mib"]
        lines.append(f"server RSS MiB: idle {rss['idle_before_warmup']}, after warm-up {rss['start']}, "
                     f"end {rss['end']}; peak in 1st half {rss['peak_first_half']}, "
                     f"in 2nd half {rss['peak_second_half']}")
    unexpected = summary["unexpected"]
    lines.append(f"load average (1 min) of this shared machine at the end: {summary['load_average_1min']}")
    lines.append(f"UNEXPECTED ERRORS: {sum(unexpected.values())}" + (f" {unexpected}" if unexpected else ""))
    lines.extend(f"  e.g. {key}: {detail}" for key, detail in summary["unexpected_examples"].items())
    return "\n".join(lines)


def _fmt(stats: dict) -> str:
    return "  ".join(f"{key} {value}" for key, value in stats.items())


def plot(records: Sequence[Record], rss_samples: Sequence[tuple[float, int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    colours = {"expected": "tab:green", "shed": "tab:orange", "unexpected": "tab:red"}
    for verdict, colour in colours.items():
        chosen = [r for r in records if r.verdict == verdict]
        top.scatter([r.started for r in chosen], [r.seconds * 1000 for r in chosen], s=3, c=colour, label=verdict)
    top.set_ylabel("latency (ms)")
    top.set_yscale("log")
    top.legend(markerscale=4)
    bottom.plot([t for t, _ in rss_samples], [v / 2**20 for _, v in rss_samples], color="tab:blue")
    bottom.set_ylabel("server RSS (MiB)")
    bottom.set_xlabel("seconds")
    fig.suptitle("room classifier soak")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="soak this running service instead of starting one (loopback only)")
    parser.add_argument("--pid", type=int, help="with --url: the server's PID, to follow its memory")
    parser.add_argument("--service", default=DEFAULT_SERVICE, help="what `bentoml serve` runs")
    parser.add_argument("--tiny-model", action="store_true", help="serve the tiny test model from a temporary home")
    parser.add_argument("--model-home", help="serve a copy of room_classifier:latest from this BentoML home")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--photos", type=int, default=32)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--backoff", type=float, default=1.0,
                        help="seconds a client waits after 429/503 (the service's Retry-After); 0 hammers on")
    parser.add_argument("--warmup-seconds", type=float, default=10.0,
                        help="same mix before the measured soak, so RSS growth is not first-use allocation")
    parser.add_argument("--json", type=Path, help="also write the summary as JSON here")
    parser.add_argument("--plot", type=Path, help="also draw latency over time and RSS into this PNG")
    args = parser.parse_args(argv)
    require_loopback_url(parser, args.url)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rc-soak-")))
        good = write_jpegs(find_room_photos(args.data, args.photos), (640, 480), workdir / "good")
        inputs = make_inputs(good, workdir, stack.enter_context(serving_images()))
        if args.url:
            url, rss = args.url, (lambda: process_tree_rss(args.pid) if args.pid else 0)
        else:
            env = {"RC_URL_ALLOWLIST": "127.0.0.1/32"}
            if args.tiny_model or args.model_home:
                env["BENTOML_HOME"] = stack.enter_context(temporary_model_home(args.model_home))
            server = stack.enter_context(start_bento_server(args.service, env=env))
            url, rss = server.url, server.rss_bytes
        idle_rss = rss()
        if args.warmup_seconds > 0:
            soak(url, inputs, args.clients, args.warmup_seconds, rss, args.backoff)
        print(f"soaking {url}: {args.clients} clients for {args.seconds:.0f} s", file=sys.stderr)
        records, rss_samples = soak(url, inputs, args.clients, args.seconds, rss, args.backoff)
        summary = report(records, rss_samples, max(args.seconds, rss_samples[-1][0]))
        if summary["rss_mib"]:
            summary["rss_mib"]["idle_before_warmup"] = mib(idle_rss)
    print(format_report(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.plot:
        plot(records, rss_samples, args.plot)
    return 1 if summary["verdicts"].get("unexpected") else 0


if __name__ == "__main__":
    sys.exit(main())
