"""ONNX Runtime latency on this machine's CPU, the way the service runs the model (the logits output only).

`python -m training.latency A.onnx B.onnx [--rounds 4]` times models side by side in alternating rounds, so a
busy shared machine slows them alike, and prints each model's best round and B's ratio to A.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from inference.model import OUTPUT_NAME, create_session


def measure_latency_ms(onnx_path: Path, image_size: int, batch_sizes: tuple[int, ...] = (1, 16),
                       threads: int = 2, repeats: int = 20) -> dict[str, float]:
    """Median wall time of one `session.run` per batch size, after warm-up, in milliseconds."""
    session = create_session(onnx_path, threads, onnx_path.name)
    input_name = session.get_inputs()[0].name
    results = {}
    for batch_size in batch_sizes:
        batch = np.random.default_rng(0).standard_normal((batch_size, 3, image_size, image_size), dtype=np.float32)
        for _ in range(3):
            session.run([OUTPUT_NAME], {input_name: batch})
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run([OUTPUT_NAME], {input_name: batch})
            timings.append((time.perf_counter() - start) * 1000)
        results[f"batch{batch_size}_ms"] = float(np.median(timings))
    return results


def compare_latency(paths: list[Path], image_size: int, rounds: int) -> dict[str, dict[str, float]]:
    """Each model's best round (lowest median) per batch size, the models taking turns every round."""
    best: dict[str, dict[str, float]] = {str(path): {} for path in paths}
    for _ in range(rounds):
        for path in paths:
            for key, value in measure_latency_ms(path, image_size).items():
                best[str(path)][key] = min(value, best[str(path)].get(key, float("inf")))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m training.latency", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="ONNX files; the first is the baseline")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    best = compare_latency(args.models, args.image_size, args.rounds)
    baseline = best[str(args.models[0])]
    for path, timings in best.items():
        ratios = ", ".join(f"{key} x{value / baseline[key]:.3f}" for key, value in timings.items())
        print(f"{path}: " + ", ".join(f"{key} {value:.2f}" for key, value in timings.items()) + f" ({ratios})")
    print(json.dumps(best))


if __name__ == "__main__":
    main()
