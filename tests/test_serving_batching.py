"""GreedyBatcher: a lone call runs at once, calls arriving while the model is busy run together next,
batches stay within max_batch_size, a call that waits too long is refused, errors reach every caller of
the batch, callers that gave up are skipped, and the statistics can be read while batches run."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batching import GreedyBatcher, QueueTimeout


class SlowModel:
    """Doubles its inputs; each run holds until `gate` opens (or at once without a gate); records sizes."""

    def __init__(self, gated: bool = False) -> None:
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.sizes: list[int] = []
        self.explained: list[bool] = []
        self.started = threading.Event()

    def __call__(self, batch: np.ndarray, explain: bool) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        self.started.set()
        self.gate.wait(timeout=10)
        self.sizes.append(len(batch))
        self.explained.append(explain)
        return (batch * 2, batch * 10) if explain else batch * 2


def inputs(value: float, images: int = 1) -> np.ndarray:
    return np.full((images, 3), value, dtype=np.float32)


def test_a_lone_call_runs_at_once_and_gets_its_own_rows() -> None:
    model = SlowModel()
    observed: list[str] = []

    async def scenario() -> np.ndarray:
        batcher = GreedyBatcher(model, max_batch_size=16, max_wait_s=1.0,
                                observe=lambda stage, seconds: observed.append(stage))
        return await batcher(inputs(1.5, images=2))

    started = time.monotonic()
    result = asyncio.run(scenario())
    assert time.monotonic() - started < 1.0  # no waiting for company (generous bound for a loaded machine)
    assert np.array_equal(result, inputs(3.0, images=2))
    assert model.sizes == [2] and observed == ["queue", "inference"]


def test_calls_that_arrive_while_the_model_is_busy_run_as_one_batch_in_order() -> None:
    model = SlowModel(gated=True)

    async def scenario() -> list[np.ndarray]:
        batcher = GreedyBatcher(model, max_batch_size=16, max_wait_s=5.0)
        first = asyncio.create_task(batcher(inputs(0)))
        await asyncio.to_thread(model.started.wait, 5)  # the first batch is running
        rest = [asyncio.create_task(batcher(inputs(value, images=2))) for value in (1, 2, 3)]
        await asyncio.sleep(0.05)
        model.gate.set()
        results = await asyncio.gather(first, *rest)
        assert batcher.stats()["largest_batch"] == 6
        return results

    results = asyncio.run(scenario())
    assert model.sizes == [1, 6]
    for value, result in zip((0, 1, 2, 3), results):
        assert np.array_equal(result, inputs(2 * value, images=len(result)))


def test_batches_never_exceed_max_batch_size() -> None:
    model = SlowModel(gated=True)

    async def scenario() -> None:
        batcher = GreedyBatcher(model, max_batch_size=4, max_wait_s=5.0)
        first = asyncio.create_task(batcher(inputs(0)))
        await asyncio.to_thread(model.started.wait, 5)
        rest = [asyncio.create_task(batcher(inputs(value))) for value in range(1, 10)]
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(first, *rest)

    asyncio.run(scenario())
    assert model.sizes == [1, 4, 4, 1]


def test_max_batch_size_one_turns_batching_off() -> None:
    model = SlowModel(gated=True)

    async def scenario() -> None:
        batcher = GreedyBatcher(model, max_batch_size=1, max_wait_s=5.0)
        first = asyncio.create_task(batcher(inputs(0)))
        await asyncio.to_thread(model.started.wait, 5)
        rest = [asyncio.create_task(batcher(inputs(value))) for value in range(1, 4)]
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(first, *rest)

    asyncio.run(scenario())
    assert model.sizes == [1, 1, 1, 1]


def test_a_call_that_waited_too_long_is_refused_and_the_rest_go_on() -> None:
    model = SlowModel(gated=True)

    async def scenario() -> None:
        batcher = GreedyBatcher(model, max_batch_size=16, max_wait_s=0.05)
        first = asyncio.create_task(batcher(inputs(0)))
        await asyncio.to_thread(model.started.wait, 5)
        late = asyncio.create_task(batcher(inputs(1)))
        await asyncio.sleep(0.2)  # longer than max_wait_s while the model is busy
        model.gate.set()
        assert np.array_equal(await first, inputs(0))
        with pytest.raises(QueueTimeout, match="waited"):
            await late
        assert np.array_equal(await batcher(inputs(4)), inputs(8))  # the batcher still works

    asyncio.run(scenario())
    assert model.sizes == [1, 1]


def test_an_error_reaches_every_caller_of_the_batch() -> None:
    def broken(batch: np.ndarray, explain: bool) -> np.ndarray:
        raise RuntimeError("onnx says no")

    async def scenario() -> list[object]:
        batcher = GreedyBatcher(broken, max_batch_size=16, max_wait_s=1.0)
        return await asyncio.gather(batcher(inputs(0)), batcher(inputs(1)), return_exceptions=True)

    results = asyncio.run(scenario())
    assert all(isinstance(result, RuntimeError) for result in results)


def test_a_caller_that_gave_up_is_skipped() -> None:
    model = SlowModel(gated=True)

    async def scenario() -> None:
        batcher = GreedyBatcher(model, max_batch_size=16, max_wait_s=5.0)
        first = asyncio.create_task(batcher(inputs(0)))
        await asyncio.to_thread(model.started.wait, 5)
        gone = asyncio.create_task(batcher(inputs(1)))
        kept = asyncio.create_task(batcher(inputs(2)))
        await asyncio.sleep(0.01)
        gone.cancel()
        model.gate.set()
        await asyncio.gather(first, kept)

    asyncio.run(scenario())
    assert model.sizes == [1, 1]  # the cancelled call never reached the model


def test_statistics_can_be_read_while_batches_run() -> None:
    model = SlowModel()

    async def scenario() -> dict[str, object]:
        batcher = GreedyBatcher(model, max_batch_size=16, max_wait_s=5.0)
        calls = [asyncio.create_task(batcher(inputs(value, images=1 + value % 3))) for value in range(60)]
        snapshots = []
        while not all(call.done() for call in calls):
            snapshots.append(batcher.stats())
            await asyncio.sleep(0)
        await asyncio.gather(*calls)
        assert snapshots and all(isinstance(snap["images"], int) for snap in snapshots)
        return batcher.stats()

    stats = asyncio.run(scenario())
    assert stats["images"] == sum(1 + value % 3 for value in range(60))
    assert stats["onnx_runs"] == len(model.sizes)


def test_extra_outputs_are_fetched_only_for_batches_that_ask_and_each_caller_gets_its_rows() -> None:
    """A batch asks the model for its maps only when one of its calls wants them; a mixed batch is still one
    run, and each caller gets its own rows of every output."""
    model = SlowModel(gated=True)

    async def scenario() -> tuple[object, ...]:
        batcher = GreedyBatcher(model, max_batch_size=16, max_wait_s=5.0)
        first = asyncio.create_task(batcher(inputs(0)))
        await asyncio.to_thread(model.started.wait, 5)
        plain = asyncio.create_task(batcher(inputs(1)))
        explained = asyncio.create_task(batcher(inputs(2, images=2), explain=True))
        await asyncio.sleep(0.05)
        model.gate.set()
        return await first, await plain, await explained

    first, plain, explained = asyncio.run(scenario())
    assert model.sizes == [1, 3] and model.explained == [False, True]
    assert np.array_equal(first, inputs(0))
    assert np.array_equal(plain[0], inputs(2.0)) and np.array_equal(plain[1], inputs(10.0))
    assert np.array_equal(explained[0], inputs(4.0, images=2)) and np.array_equal(explained[1], inputs(20.0, images=2))
