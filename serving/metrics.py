"""Time spent per serving stage, exported as the Prometheus histogram `rc_stage_seconds{stage=...}`.

BentoML's `/metrics` shows it next to its own request metrics, summed over all worker processes, so
`python -m benchmarks.speed` (and any Prometheus) can say where each millisecond of a request goes:

| stage | process | what |
|---|---|---|
| fetch | API | downloading an `image_url` |
| decode | API | reading an upload, decoding, resizing and cropping (thread wait included) |
| model_call | API | the round trip to the model process (serialisation, queue, inference) |
| handler | API | the whole endpoint body, from parsed request to the answer object |
| queue | model | a call waiting for the model to be free |
| inference | model | one batch: normalisation + ONNX Runtime |

What a client sees beyond `handler` is HTTP: reading and parsing the body, and sending the answer.
`rc_batch_size` counts the images of each model run (adaptive batching at work).
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from typing import Any, Iterator

BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@functools.cache
def stage_histogram() -> Any:
    """Created on first use, inside a worker: BentoML sets the multiprocess metrics folder only then."""
    import prometheus_client

    return prometheus_client.Histogram("rc_stage_seconds", "Time per serving stage of the room classifier",
                                       labelnames=["stage"], buckets=BUCKETS)


@functools.cache
def batch_size_histogram() -> Any:
    import prometheus_client

    return prometheus_client.Histogram("rc_batch_size", "Images per model run of the room classifier",
                                       buckets=(1, 2, 4, 8, 16, 32, 64))


def observe_batch_size(images: int) -> None:
    batch_size_histogram().observe(images)


def observe(stage: str, seconds: float) -> None:
    stage_histogram().labels(stage=stage).observe(seconds)


@contextmanager
def timed(stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        observe(stage, time.perf_counter() - started)
