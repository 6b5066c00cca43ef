"""Benchmark: images/s of a bulk job against a plain loop and the HTTP service, and the job's memory as it grows.

    python -m benchmarks.bulk [--photos 2000] [--repeat 10] [--model-home DIR | --tiny-model] [--json FILE]

On the same real photos (`--photos` from the shared data's extra/*/<class>/, read in place), same model, same
machine, one measurement at a time:
  (a) a plain loop over inference/ (read, bytes_to_input, logits, postprocess): one process, then one process
      per core (the best a single machine does without Ray);
  (b) `python -m bulk` on local Ray (a subprocess, as a user runs it): images/s over the whole run and once
      Ray is up, peak memory of its process tree (driver, Ray daemons, workers: sum of PSS, and of RSS);
  (c) the HTTP service (`bentoml serve`, its default RC_* settings) under `--clients` clients sending
      classify_batch requests of 16 uploads;
  (d) the bulk job on `--repeat` x the photos (a list file naming each photo `--repeat` times): peak memory.
(a) and (b) take turns `--rounds` times, and (a) runs once more after (d); the best round of each counts.
The model is a copy of room_classifier:latest from `--model-home` (default: the default BentoML home, if it
has one), else the tiny test model; the output says which. The machine may be shared: compare the ratios
printed at the end, measured in the same run, rather than the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import psutil
from tqdm import tqdm

from testkit.model_home import run_with_home, temporary_model_home
from testkit.photos import DEFAULT_DATA, find_room_photos
from testkit.server import process_tree_pss, process_tree_rss, start_bento_server

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH = 32
SERVICE_IMAGES_PER_REQUEST = 16


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="shared data folder with extra/<source>/<class>/")
    parser.add_argument("--photos", type=int, default=2000, help="distinct real photos")
    parser.add_argument("--repeat", type=int, default=10, help="the memory run classifies photos x repeat inputs")
    parser.add_argument("--model-home", help="BentoML home to copy room_classifier:latest from "
                        "(default: the default BentoML home, if it holds one)")
    parser.add_argument("--tiny-model", action="store_true", help="use the tiny test model")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients of the service in (c)")
    parser.add_argument("--parts", default="a,b,c,d", help="which measurements to run (comma-separated)")
    parser.add_argument("--rounds", type=int, default=2, help="(a) and (b) are run this often, taking turns; "
                        "the best round of each is reported")
    parser.add_argument("--bulk-args", default="", help="extra arguments for `python -m bulk` (b, d)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def default_model_home() -> str | None:
    """The BentoML home a plain `bentoml models list` uses, if it holds room_classifier:latest."""
    home = os.environ.get("BENTOML_HOME") or str(Path.home() / "bentoml")
    try:
        run_with_home(home, ["-c", "import bentoml; bentoml.models.get('room_classifier:latest')"])
    except RuntimeError:
        return None
    return home


# ----------------------------------------------------------------------------------------------------
# (a) the plain loop


_WORKER: dict[str, Any] = {}


def init_loop_worker(bundle: Any, settings: Any, threshold: float) -> None:
    from bulk.model import load_classifier

    _WORKER["classifier"] = load_classifier(bundle, 1)
    _WORKER["settings"] = settings
    _WORKER["threshold"] = threshold


def classify_paths(paths: Sequence[str]) -> tuple[int, float]:
    """What a bulk job does for these paths, with nothing but inference/: read, decode + preprocess, model, softmax.
    Returns the count and the CPU seconds this process spent on them."""
    from inference.postprocess import postprocess
    from inference.preprocess import bytes_to_input

    classifier, settings, threshold = _WORKER["classifier"], _WORKER["settings"], _WORKER["threshold"]
    info = classifier.info
    cpu_started = time.process_time()
    for start in range(0, len(paths), BATCH):
        batch = np.stack([bytes_to_input(Path(path).read_bytes(), info.preprocessing, settings.limits)
                          for path in paths[start:start + BATCH]])
        postprocess(classifier.logits(batch), info.labels, info.temperature, len(info.labels), threshold)
    return len(paths), time.process_time() - cpu_started


def plain_loop(paths: Sequence[str], processes: int) -> dict[str, Any]:
    """Images/s of `processes` loop processes (one ONNX Runtime thread each), after every model is loaded."""
    from bulk.model import read_model_bundle
    from bulk.stages import LoadSettings
    from inference.config import KernelConfig

    config = KernelConfig.from_env()
    bundle = read_model_bundle("room_classifier:latest")
    settings = LoadSettings.from_config(config, bundle.info, Path("/"))
    shards = [list(paths[i::processes]) for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes, init_loop_worker,
                                                   (bundle, settings, config.uncertain_threshold)) as pool:
        pool.map(classify_paths, [[p] for p in paths[:processes * 2]], chunksize=1)  # every worker loaded
        started = time.perf_counter()
        done = pool.map(classify_paths, shards, chunksize=1)
        seconds = time.perf_counter() - started
    count, cpu_seconds = sum(n for n, _ in done), sum(cpu for _, cpu in done)
    return {"processes": processes, "images": count, "seconds": round(seconds, 2),
            "images_per_s": round(count / seconds, 2), "cpu_ms_per_image": round(1000 * cpu_seconds / count, 2)}


# ----------------------------------------------------------------------------------------------------
# (b), (d) the bulk job as a user runs it


def bulk_job(list_file: Path, out: Path, extra_args: str) -> dict[str, Any]:
    """`python -m bulk` in a subprocess; its summary plus the peak RSS of its process tree (sampled 4x/s)."""
    command = [sys.executable, "-m", "bulk", str(list_file), "--out", str(out), "--json", "--no-progress",
               *extra_args.split()]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"rss": 0, "pss": 0}
    cpu_by_pid: dict[int, float] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], process_tree_rss(process.pid))
            peak["pss"] = max(peak["pss"], process_tree_pss(process.pid))
            cpu_by_pid.update(process_tree_cpu(process.pid))
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-4000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    cpu_ms = 1000 * sum(cpu_by_pid.values()) / max(1, summary["classified_now"])
    return {**summary, "peak_rss_mib": round(peak["rss"] / 2**20, 1), "peak_pss_mib": round(peak["pss"] / 2**20, 1),
            "cpu_ms_per_image": round(cpu_ms, 2)}


def process_tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) so far of a process and its descendants, by pid. Sampled 4x/s, so a
    process that ends between samples loses its last quarter second: a slight undercount."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    found = {}
    for process in processes:
        try:
            times = process.cpu_times()
            found[process.pid] = times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return found


# ----------------------------------------------------------------------------------------------------
# (c) the HTTP service


def service_rate(paths: Sequence[Path], clients: int) -> dict[str, Any]:
    """Images/s of the running service answering classify_batch requests of 16 uploads from `clients` clients."""
    chunks = [list(paths[i:i + SERVICE_IMAGES_PER_REQUEST]) for i in range(0, len(paths), SERVICE_IMAGES_PER_REQUEST)]
    with start_bento_server() as server:
        send_batches(server.url, chunks[:clients * 2], clients)  # warm-up: sessions, threads, first batches
        outcomes, seconds = send_batches(server.url, chunks, clients)
    images = sum(len(chunk) for chunk, outcome in zip(chunks, outcomes) if outcome == "ok")
    errors = dict(Counter(outcome for outcome in outcomes if outcome != "ok"))
    return {"clients": clients, "images_per_request": SERVICE_IMAGES_PER_REQUEST, "images": images,
            "errors": errors, "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 2)}


def send_batches(url: str, chunks: Sequence[list[Path]], clients: int) -> tuple[list[str], float]:
    """Send each chunk as one classify_batch request through BentoML's generated client, `clients` at a time;
    return each request's outcome ("ok" or its error code) and the wall time."""
    import bentoml

    from benchmarks.client_calls import classify_uploads, error_code_of

    local = threading.local()

    def send(chunk: list[Path]) -> str:
        if not hasattr(local, "client"):
            local.client = bentoml.SyncHTTPClient(url, timeout=120)
        try:
            classify_uploads(local.client, chunk)
            return "ok"
        except Exception as exc:  # noqa: BLE001 - every failure is counted by name, none stops the run
            return error_code_of(exc)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        outcomes = list(tqdm(pool.map(send, chunks), total=len(chunks), desc="service", unit="request"))
    return outcomes, time.perf_counter() - started


# ----------------------------------------------------------------------------------------------------


def write_list(paths: Sequence[Path], repeat: int, target: Path) -> Path:
    target.write_text("".join(f"{path}\n" for _ in range(repeat) for path in paths))
    return target


def report(results: dict[str, Any]) -> str:
    lines = [f"model: {results['model']}; {results['photos']} photos; {results['cpus']} CPUs; "
             f"load average before/after: {results['load_before']:.2f} / {results.get('load_after', 0):.2f}"]
    a1, an = results.get("loop_1"), results.get("loop_all")
    if a1:
        lines.append(f"(a) plain loop, 1 process:            {a1['images_per_s']:8.1f} images/s, "
                     f"{a1['cpu_ms_per_image']} CPU-ms/image")
    if an:
        lines.append(f"(a) plain loop, {an['processes']} processes:           {an['images_per_s']:8.1f} images/s, "
                     f"{an['cpu_ms_per_image']} CPU-ms/image")
    b = results.get("bulk")
    if b:
        lines.append(f"(b) bulk job on local Ray:            {b['pipeline_images_per_s'] or 0:8.1f} images/s once Ray "
                     f"is up ({b['images_per_s']:.1f} images/s over the whole wall time of {b['wall_s']} s); "
                     f"peak memory: PSS {b['peak_pss_mib']} MiB, RSS {b['peak_rss_mib']} MiB; "
                     f"{b['cpu_ms_per_image']} CPU-ms/image "
                     "(all of Ray's processes, start included)")
    c = results.get("service")
    if c:
        lines.append(f"(c) HTTP service, classify_batch:     {c['images_per_s']:8.1f} images/s "
                     f"({c['clients']} clients x {c['images_per_request']} images/request, errors {c['errors'] or 0})")
    d = results.get("bulk_repeat")
    if d:
        lines.append(f"(d) bulk job, {d['inputs']} inputs:         peak memory: PSS {d['peak_pss_mib']} MiB, RSS "
                     f"{d['peak_rss_mib']} MiB (vs PSS {b['peak_pss_mib'] if b else '?'}, RSS "
                     f"{b['peak_rss_mib'] if b else '?'} MiB for {b['inputs'] if b else '?'} inputs); "
                     f"{d['pipeline_images_per_s']} images/s once Ray is up, wall {d['wall_s']} s; "
                     f"{d['cpu_ms_per_image']} CPU-ms/image")
    best_loop = max((x["images_per_s"] for x in (a1, an) if x), default=None)
    d = results.get("bulk_repeat")
    if b and best_loop:
        lines.append(f"ratio (b) once Ray is up / best (a): {(b['pipeline_images_per_s'] or 0) / best_loop:.2f}; "
                     f"(b) over the whole wall time / best (a): {b['images_per_s'] / best_loop:.2f}")
    if d and best_loop:
        lines.append(f"ratio (d) once Ray is up / best (a): {(d['pipeline_images_per_s'] or 0) / best_loop:.2f} "
                     "(the sustained rate: Ray's start and warm-up amortised over the long run)")
    if b and c:
        lines.append(f"ratio (b) once Ray is up / (c): {(b['pipeline_images_per_s'] or 0) / c['images_per_s']:.2f}")
    if d and c:
        lines.append(f"ratio (d) once Ray is up / (c): {(d['pipeline_images_per_s'] or 0) / c['images_per_s']:.2f}")
    if b and d and d["classified_now"] > b["classified_now"]:
        extra_cpu = d["cpu_ms_per_image"] * d["classified_now"] - b["cpu_ms_per_image"] * b["classified_now"]
        marginal = extra_cpu / (d["classified_now"] - b["classified_now"])
        lines.append(f"marginal CPU-ms/image of the job ((d) - (b), Ray's fixed start cost cancelled): {marginal:.2f}"
                     + (f"; vs (a) 1 process: {a1['cpu_ms_per_image'] / marginal:.2f}" if a1 else ""))
    if a1 and d:
        lines.append(f"CPU efficiency (d) vs (a) 1 process: {a1['cpu_ms_per_image'] / d['cpu_ms_per_image']:.2f} "
                     "(CPU-ms per image: robust to other jobs on a shared machine; on dedicated cores, images/s "
                     "= cores x 1000 / CPU-ms per image)")
    if a1:
        lines.append(f"per-core rate of the plain loop: {a1['images_per_s']:.1f} images/s "
                     f"({1000 / a1['cpu_ms_per_image']:.1f} images per CPU-second)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    parts = {part.strip() for part in args.parts.split(",")}
    source_home = None if args.tiny_model else (args.model_home or default_model_home())
    results: dict[str, Any] = {"photos": args.photos, "cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}
    with ExitStack() as stack:
        home = stack.enter_context(temporary_model_home(source_home))
        os.environ["BENTOML_HOME"] = home  # before anything imports bentoml; subprocesses inherit it
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rc-bulk-bench-")))
        tag = run_with_home(home, ["-c", "import bentoml; m = bentoml.models.get('room_classifier:latest'); "
                                   "print(m.tag, m.info.metadata['architecture'], "
                                   "m.info.metadata.get('precision', ''))"])
        results["model"] = f"{tag.strip()} ({'copied from ' + source_home if source_home else 'tiny test model'})"
        photos = find_room_photos(args.data, args.photos)
        names = [str(path) for path in photos]
        print(f"{len(photos)} photos; model {results['model']}", file=sys.stderr)
        runs: dict[str, list[dict[str, Any]]] = {"loop_1": [], "loop_all": [], "bulk": []}
        for round_index in range(args.rounds):  # (a) and (b) take turns: a noisy minute hits both alike
            if "a" in parts:
                runs["loop_1"].append(plain_loop(names, 1))
                runs["loop_all"].append(plain_loop(names, os.cpu_count() or 1))
                print(f"(a) round {round_index + 1}: {runs['loop_1'][-1]}, {runs['loop_all'][-1]}", file=sys.stderr)
            if "b" in parts:
                runs["bulk"].append(bulk_job(write_list(photos, 1, workdir / "photos.txt"),
                                             workdir / f"b{round_index}.parquet", args.bulk_args))
                print(f"(b) round {round_index + 1}: {runs['bulk'][-1]}", file=sys.stderr)
        results["rounds"] = runs
        for name, measured in runs.items():  # the best round of each
            if measured:
                results[name] = max(measured, key=lambda run: run.get("pipeline_images_per_s")
                                    or run["images_per_s"])
        if "c" in parts:
            results["service"] = service_rate(photos, args.clients)
            print(f"(c) {results['service']}", file=sys.stderr)
        if "d" in parts:
            results["bulk_repeat"] = bulk_job(write_list(photos, args.repeat, workdir / "repeat.txt"),
                                              workdir / "d.parquet", args.bulk_args)
            print(f"(d) {results['bulk_repeat']}", file=sys.stderr)
            if "a" in parts:  # the machine may have quietened (or not) meanwhile: measure the loop again
                runs["loop_1"].append(plain_loop(names, 1))
                runs["loop_all"].append(plain_loop(names, os.cpu_count() or 1))
                print(f"(a) after (d): {runs['loop_1'][-1]}, {runs['loop_all'][-1]}", file=sys.stderr)
                for name in ("loop_1", "loop_all"):
                    results[name] = max(runs[name], key=lambda run: run["images_per_s"])
    results["load_after"] = os.getloadavg()[0]
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
