"""A serving batcher runs batches for months: what it records of them must not grow forever."""

from __future__ import annotations

import asyncio

from moerge.coordinator.inference.batcher import RECENT_BATCHES, MicroBatcher


def test_batch_sizes_keep_only_recent_batches() -> None:
    async def run() -> MicroBatcher[int, int]:
        async with MicroBatcher(lambda items: items, max_wait_ms=0) as batcher:
            for i in range(3 * RECENT_BATCHES):
                assert await batcher.submit(i) == i
        return batcher

    batcher = asyncio.run(run())
    assert batcher.batches == 3 * RECENT_BATCHES
    assert RECENT_BATCHES <= len(batcher.batch_sizes) <= 2 * RECENT_BATCHES
    assert set(batcher.batch_sizes) == {1}
