"""The micro-batcher groups concurrent calls, bounds waiting, propagates errors, shuts down."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch

from moerge.coordinator.inference.batcher import BatcherClosed, MicroBatcher
from moerge.coordinator.inference.engine import InferenceEngine, InferenceRequest
from moerge.coordinator.inference.errors import UnknownExpert
from moerge.coordinator.inference.plan import RoutingPlan
from tests.inference.engine_helpers import TEXTS, make_classification_experts
from tests.tiny_models import make_tiny_bert


class Recorder:
    """A batch function that doubles numbers and remembers each batch it was given."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.delay = delay

    def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        return [ValueError(f"bad item {i}") if i < 0 else 2 * i for i in items]


def test_concurrent_submissions_run_as_one_batch_off_the_event_loop():
    fn = Recorder()

    async def main() -> list[int]:
        async with MicroBatcher(fn, max_batch_size=64, max_wait_ms=50) as batcher:
            return await asyncio.gather(*(batcher.submit(i) for i in range(10)))

    assert asyncio.run(main()) == [2 * i for i in range(10)]
    assert fn.batches == [list(range(10))]
    assert fn.threads and threading.main_thread().name not in fn.threads


def test_batches_never_exceed_the_maximum_size_counted_by_size_of():
    fn = Recorder()

    async def main() -> list[int]:
        batcher = MicroBatcher(fn, max_batch_size=6, max_wait_ms=50, size_of=lambda i: 2)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(7)))
        await batcher.aclose()
        return results

    assert asyncio.run(main()) == [2 * i for i in range(7)]
    assert [len(b) for b in fn.batches] == [3, 3, 1]


def test_a_lone_request_waits_no_longer_than_the_bound():
    fn = Recorder()

    async def main() -> float:
        async with MicroBatcher(fn, max_wait_ms=20) as batcher:
            start = time.perf_counter()
            assert await batcher.submit(21) == 42
            return time.perf_counter() - start

    assert asyncio.run(main()) < 1.0
    assert fn.batches == [[21]]


def test_an_item_error_reaches_only_its_caller_and_a_batch_error_reaches_every_caller():
    fn = Recorder()

    def broken(items: list[int]) -> list[int]:
        raise RuntimeError("engine down")

    async def main() -> None:
        async with MicroBatcher(fn, max_wait_ms=50) as batcher:
            results = await asyncio.gather(
                batcher.submit(1), batcher.submit(-1), batcher.submit(3), return_exceptions=True
            )
            assert results[0] == 2 and results[2] == 6
            assert isinstance(results[1], ValueError) and "bad item -1" in str(results[1])
        async with MicroBatcher(broken, max_wait_ms=50) as batcher:
            results = await asyncio.gather(
                *(batcher.submit(i) for i in range(3)), return_exceptions=True
            )
            assert all(isinstance(r, RuntimeError) and "engine down" in str(r) for r in results)

    asyncio.run(main())


def test_close_finishes_queued_work_then_refuses_new_items():
    fn = Recorder(delay=0.05)

    async def main() -> None:
        batcher = MicroBatcher(fn, max_batch_size=2, max_wait_ms=1)
        pending = [asyncio.ensure_future(batcher.submit(i)) for i in range(5)]
        await asyncio.sleep(0)  # let every submission reach the queue
        await batcher.aclose()
        assert [p.result() for p in pending] == [0, 2, 4, 6, 8]
        with pytest.raises(BatcherClosed):
            await batcher.submit(9)

    asyncio.run(main())
    assert sorted(i for b in fn.batches for i in b) == [0, 1, 2, 3, 4]


def test_engine_requests_from_concurrent_callers_share_one_engine_pass(tmp_path: Path):
    base = make_tiny_bert(tmp_path / "bert")
    folders = make_classification_experts(base, tmp_path / "experts")
    engine = InferenceEngine(base, max_rank=8, max_length=24, expert_loader=folders.__getitem__)
    plans = [RoutingPlan.explicit([["sent-a"]]), RoutingPlan.explicit([["topic"]])]
    requests = [InferenceRequest([text], plans[i % 2]) for i, text in enumerate(TEXTS)]
    bad = InferenceRequest([TEXTS[0]], RoutingPlan.explicit([["ghost"]]))
    direct = [engine.predict(r.texts, r.plan) for r in requests]

    batcher = MicroBatcher(
        engine.predict_many,
        max_wait_ms=50,
        executor=engine.executor,
        size_of=lambda r: len(r.texts),
    )

    async def main() -> list[object]:
        async with batcher:
            return await asyncio.gather(
                *(batcher.submit(r) for r in [*requests, bad]), return_exceptions=True
            )

    *served, failed = asyncio.run(main())
    assert batcher.batch_sizes == [len(requests) + 1]  # one engine call for all callers
    direct = [engine.predict(r.texts, r.plan) for r in requests]
    assert isinstance(failed, UnknownExpert)
    for got, expected in zip(served, direct, strict=True):
        assert [p.output for p in got] == [p.output for p in expected]
        torch.testing.assert_close(
            torch.tensor(got[0].probabilities),
            torch.tensor(expected[0].probabilities),
            atol=1e-5,
            rtol=0,
        )
    engine.close()
