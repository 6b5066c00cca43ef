"""Adaptive batching that never waits for company.

While the model runs a batch, the calls that arrive queue up; the moment it is free, everything queued
(up to `max_batch_size` images) runs as the next batch. A lone call runs at once, so light traffic pays
nothing for batching; under load the batch grows with the queue, which is when batching pays off.

BentoML's own dispatcher (`batchable=True`) instead holds each call for a wait it learns from past
traffic and polls its queue every millisecond: after a busy minute a single request still waited
~80 ms for company that never came (README, "Serving speed"). This keeps the same knobs:
`max_batch_size` (1 turns batching off) and `max_wait_s`, the longest a call may queue before it is
refused as overloaded.

A call may ask for the model's extra outputs (`explain=True`: the class-activation maps). A batch fetches them
only when one of its calls asked, so calls that did not ask cost what they always did, and a mixed batch still
runs as one.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np

Observer = Callable[[str, float], None]
Outputs = Union[np.ndarray, tuple[np.ndarray, ...]]  # one array, or several with the same first axis


class QueueTimeout(Exception):
    """A call waited longer than `max_wait_s` for the model: the caller should answer 'overloaded'."""


@dataclass
class Job:
    inputs: np.ndarray
    future: asyncio.Future
    explain: bool = False
    enqueued: float = field(default_factory=time.monotonic)


class GreedyBatcher:
    """Runs `run_batch(inputs [N, ...], explain) -> outputs [N, ...]` on batches of concurrent calls
    (with `explain`, a tuple of arrays [N, ...]: each call gets its rows of each).

    `run_batch` runs in one dedicated thread, one batch at a time (ONNX Runtime's own threads do the
    parallel work), so the event loop stays free to take new calls. `observe(stage, seconds)`, if
    given, receives each call's queue wait ("queue") and each batch's run time ("inference").
    """

    def __init__(self, run_batch: Callable[[np.ndarray, bool], Outputs], max_batch_size: int, max_wait_s: float,
                 observe: Optional[Observer] = None) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.observe = observe or (lambda stage, seconds: None)
        self.queue: collections.deque[Job] = collections.deque()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.worker: Optional[asyncio.Task] = None
        self.images_per_run: collections.Counter[int] = collections.Counter()

    async def __call__(self, inputs: np.ndarray, explain: bool = False) -> Outputs:
        """The outputs for `inputs`, computed in a batch with whatever else is queued."""
        loop = asyncio.get_running_loop()
        job = Job(inputs, loop.create_future(), explain=explain)
        self.queue.append(job)
        if self.worker is None or self.worker.done():
            self.worker = loop.create_task(self.drain())
        return await job.future

    async def drain(self) -> None:
        """Run batches until the queue is empty (started by the call that finds no batch running)."""
        loop = asyncio.get_running_loop()
        while self.queue:
            jobs = self.next_batch()
            if not jobs:
                continue
            batch = jobs[0].inputs if len(jobs) == 1 else np.concatenate([job.inputs for job in jobs])
            started = time.monotonic()
            try:
                explain = any(job.explain for job in jobs)
                outputs = await loop.run_in_executor(self.executor, self.run_batch, batch, explain)
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the model's error
                for job in jobs:
                    settle(job, exception=exc)
                continue
            self.observe("inference", time.monotonic() - started)
            self.images_per_run[len(batch)] += 1
            start = 0
            for job in jobs:
                settle(job, result=rows(outputs, start, start + len(job.inputs)))
                start += len(job.inputs)

    def next_batch(self) -> list[Job]:
        """Take the queued calls that fit one batch (at least one); refuse those that waited too long."""
        now = time.monotonic()
        jobs: list[Job] = []
        images = 0
        while self.queue:
            job = self.queue[0]
            if job.future.done():  # its caller gave up (request timeout, disconnect)
                self.queue.popleft()
                continue
            waited = now - job.enqueued
            if waited > self.max_wait_s:
                self.queue.popleft()
                settle(job, exception=QueueTimeout(f"waited {waited * 1000:.0f} ms for the model "
                                                   f"(limit {self.max_wait_s * 1000:.0f} ms)"))
                continue
            if jobs and images + len(job.inputs) > self.max_batch_size:
                break
            self.queue.popleft()
            self.observe("queue", waited)
            jobs.append(job)
            images += len(job.inputs)
        return jobs

    def stats(self) -> dict[str, object]:
        """How many images each model run received (batching at work)."""
        counts = dict(self.images_per_run)
        return {"onnx_runs": sum(counts.values()), "images": sum(size * n for size, n in counts.items()),
                "largest_batch": max(counts, default=0),
                "images_per_run": {str(size): n for size, n in sorted(counts.items())}}


def rows(outputs: Outputs, start: int, stop: int) -> Outputs:
    """Rows start..stop of the batch's output (of each output, when there are several)."""
    if isinstance(outputs, tuple):
        return tuple(output[start:stop] for output in outputs)
    return outputs[start:stop]


def settle(job: Job, result: Optional[Outputs] = None, exception: Optional[BaseException] = None) -> None:
    """Complete a call unless its caller already gave up on it."""
    if job.future.done():
        return
    if exception is not None:
        job.future.set_exception(exception)
    else:
        job.future.set_result(result)
