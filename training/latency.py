"""ONNX Runtime latency on this machine's CPU, the way the service runs the model."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from inference.model import create_session


def measure_latency_ms(onnx_path: Path, image_size: int, batch_sizes: tuple[int, ...] = (1, 16),
                       threads: int = 2, repeats: int = 20) -> dict[str, float]:
    """Median wall time of one `session.run` per batch size, after warm-up, in milliseconds."""
    session = create_session(onnx_path, threads, onnx_path.name)
    input_name = session.get_inputs()[0].name
    results = {}
    for batch_size in batch_sizes:
        batch = np.random.default_rng(0).standard_normal((batch_size, 3, image_size, image_size), dtype=np.float32)
        for _ in range(3):
            session.run(None, {input_name: batch})
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, {input_name: batch})
            timings.append((time.perf_counter() - start) * 1000)
        results[f"batch{batch_size}_ms"] = float(np.median(timings))
    return results
