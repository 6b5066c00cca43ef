"""What one replica needs, measured: the numbers behind deploy/helm/room-classifier/values.yaml.

Starts `bentoml serve` several times and times each start until `/readyz` answers 200 (the startup probe's
budget), then `wrk` keeps `--clients` uploads of 1600x1200 photos in flight for `--seconds` while the server's
resident memory (RSS of its process tree: the memory request and limit) is sampled, and the CPU time it used
per second of wall time is read (the cores it keeps busy: the CPU request, limit and the HPA's target).
Last, four clients upload PNGs of RC_MAX_PIXELS pixels (decoded in full): the peak memory of the worst case.
Needs `wrk` (apt-get install wrk), like `make bench`.

    python -m benchmarks.footprint                        # a stand-in MobileNetV2 INT8 (ImageNet weights)
    python -m benchmarks.footprint --model-home ~/bentoml # room_classifier:latest of a trained model's home
    python -m benchmarks.footprint --tiny-model --starts 1 --seconds 5   # smoke run

The stand-in has the served model's architecture, size and INT8 graph (its head is untrained, so its
answers mean nothing): memory and CPU per image are the served model's. It needs the `train` extra (torch)
and the MobileNetV2 weights file in `--weights-dir`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Sequence

import psutil
import requests

from benchmarks.speed import WrkResult, run_wrk
from testkit.model_home import run_with_home, temporary_model_home
from testkit.photos import DEFAULT_DATA, find_room_photos, write_jpegs
from testkit.server import REPO_ROOT, BentoServer, start_bento_server

MIB = 2**20
DEFAULT_WEIGHTS = REPO_ROOT.parent / "shared" / "weights"
STAND_IN_ARCH = "mobilenet_v2"  # the served model's backbone (README "Results")


def register_stand_in(arch: str, weights_dir: Path) -> str:
    """An INT8 `arch` with ImageNet weights and an untrained head, saved as room_classifier in this process's
    BENTOML_HOME; return its tag. Labels come from data_prep's class list, as a training run's do."""
    import numpy as np

    from data_prep.common import CLASSES
    from inference.model import ModelContract
    from inference.preprocess import Preprocessing
    from training.backbones import build_backbone, seed_hub_cache
    from training.export import export_onnx
    from training.quantize import quantize_int8
    from training.register import save_to_model_store

    seed_hub_cache(weights_dir)
    preprocessing = Preprocessing(image_size=224)
    model = build_backbone(arch, len(CLASSES)).eval()
    calibration = np.random.default_rng(0).normal(size=(16, 3, 224, 224)).astype(np.float32)
    with tempfile.TemporaryDirectory() as workdir:
        fp32 = export_onnx(model, Path(workdir) / "fp32.onnx", preprocessing.image_size)
        int8 = quantize_int8(fp32, Path(workdir) / "model.onnx", calibration)
        contract = ModelContract(labels=tuple(CLASSES), preprocessing=preprocessing, temperature=1.0,
                                 architecture=arch)
        metadata = {**contract.to_metadata(), "metrics": {"note": "stand-in for benchmarks.footprint: untrained head"},
                    "dataset_fingerprint": "none"}
        return str(save_to_model_store(int8, metadata))


def cold_start_s(env: dict[str, str]) -> float:
    """Seconds from `bentoml serve` to the first 200 of /readyz (the server is stopped again)."""
    start = time.monotonic()
    with start_bento_server(env=env):
        return time.monotonic() - start


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    total = 0.0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def burst(server: BentoServer, photos: list[Path], clients: int, seconds: float) -> dict[str, float]:
    """`wrk` keeps `clients` uploads in flight for `seconds` (one thread, little CPU of its own); the server's
    RSS is sampled every 0.2 s meanwhile, its CPU time read before and after."""
    files = photos[0].parent / "photos.files"
    files.write_text("\n".join(str(path) for path in photos))
    result: list[WrkResult] = []
    load = threading.Thread(target=lambda: result.append(run_wrk(server.url, "upload.lua", files, clients, seconds)))
    peak_rss = server.rss_bytes()
    cpu_before, wall_before = tree_cpu_s(server.process.pid), time.monotonic()
    load.start()
    while load.is_alive():
        peak_rss = max(peak_rss, server.rss_bytes())
        time.sleep(0.2)
    wall = time.monotonic() - wall_before
    if not result:
        raise RuntimeError("wrk did not report (see above)")
    return {"requests_per_s": result[0].requests_per_s, "p99_ms": result[0].p99_ms,
            "failed": result[0].client_errors + result[0].server_errors + result[0].socket_errors,
            "shed": result[0].shed, "peak_rss_mib": peak_rss / MIB,
            "cores_busy": (tree_cpu_s(server.process.pid) - cpu_before) / wall,
            "cpu_ms_per_request": (tree_cpu_s(server.process.pid) - cpu_before) * 1000 / max(1, result[0].ok)}


def largest_images(server: BentoServer, workdir: Path, clients: int, seconds: float) -> dict[str, float]:
    """The worst case for memory: `clients` threads upload PNGs of RC_MAX_PIXELS pixels (decoded in full: no
    JPEG draft) back to back for `seconds`; peak RSS of the server."""
    import bentoml
    from PIL import Image

    from serving.config import ServiceConfig

    side = int(ServiceConfig().max_pixels ** 0.5)
    path = workdir / "largest.png"
    Image.new("RGB", (side, side), (120, 90, 60)).save(path)  # a flat PNG: small file, full-size decode
    stop_at, answered, peak_rss = time.monotonic() + seconds, [0], [server.rss_bytes()]

    def client_loop() -> None:
        with bentoml.SyncHTTPClient(server.url, timeout=120) as client:
            while time.monotonic() < stop_at:
                client.classify(image=path)
                answered[0] += 1

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        peak_rss[0] = max(peak_rss[0], server.rss_bytes())
        time.sleep(0.1)
    return {"largest_image_pixels": side * side, "largest_image_answers": answered[0],
            "largest_image_peak_rss_mib": peak_rss[0] / MIB}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model-home", help="serve a copy of --model-tag from this BentoML home")
    source.add_argument("--tiny-model", action="store_true", help="serve the tiny test model (smoke runs)")
    parser.add_argument("--model-tag", default="room_classifier:latest")
    parser.add_argument("--arch", default=STAND_IN_ARCH, help="backbone of the stand-in model")
    parser.add_argument("--weights-dir", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--starts", type=int, default=3, help="cold starts to time")
    parser.add_argument("--clients", type=int, default=32, help="uploads kept in flight (RC_MAX_CONCURRENCY)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    parser.add_argument("--register-stand-in", action="store_true", help=argparse.SUPPRESS)  # the subprocess
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.register_stand_in:
        print(register_stand_in(args.arch, args.weights_dir))
        return 0
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rc-footprint-")))
        photos = write_jpegs(find_room_photos(args.data, 16), (1600, 1200), workdir / "photos")
        if args.model_home or args.tiny_model:
            home = stack.enter_context(temporary_model_home(args.model_home, args.model_tag))
        else:
            home = stack.enter_context(temporary_model_home())  # replaced by the stand-in below
            run_with_home(home, ["-m", "benchmarks.footprint", "--register-stand-in", "--arch", args.arch,
                                 "--weights-dir", str(args.weights_dir)], timeout_s=600)
        env = {"BENTOML_HOME": home}
        if args.model_home:  # the copied model, which the service must be told to serve
            env["RC_MODEL_TAG"] = args.model_tag
        starts = [cold_start_s(env) for _ in range(args.starts)]
        server = stack.enter_context(start_bento_server(env=env))
        idle_rss = server.rss_bytes() / MIB
        model = requests.get(server.url + "/health", timeout=10).json()["model"]
        load = burst(server, photos, args.clients, args.seconds)
        load.update(largest_images(server, workdir, clients=4, seconds=args.seconds / 2))
    summary = {"model": model,
               "host_cores": len(psutil.Process().cpu_affinity() or []) or psutil.cpu_count(),
               "cold_start_s": {"each": [round(s, 2) for s in starts], "max": round(max(starts), 2),
                                "median": round(statistics.median(starts), 2)},
               "idle_rss_mib": round(idle_rss, 1), "clients": args.clients, "seconds": args.seconds,
               **{key: round(value, 2) for key, value in load.items()}}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
