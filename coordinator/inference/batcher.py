"""Group concurrent requests into one engine call: a bounded-wait asyncio micro-batcher.

``await batcher.submit(item)`` from many coroutines (e.g. concurrent Predict RPCs). A single
collector task takes the first waiting item, keeps collecting until ``max_batch_size`` items
(counted with ``size_of``, e.g. texts per request) are in or ``max_wait_ms`` have passed since
that first item, and runs ``fn(items)`` once on a worker thread (``executor``; default: a
thread of its own) so the event loop never blocks. While one batch runs, new submissions queue
and form the next batch as soon as it finishes.

``fn`` returns one result per item, in order. An element that is an exception instance is
raised to that item's caller only; if ``fn`` itself raises, every caller of the batch gets that
exception. :meth:`MicroBatcher.aclose` stops accepting items, runs those already queued, and
stops the collector; later ``submit`` calls raise :class:`BatcherClosed`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
RECENT_BATCHES = 1024
Result = TypeVar("Result")


class BatcherClosed(RuntimeError):
    """The batcher is shut down (or shutting down) and takes no new items."""


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    size: int
    future: asyncio.Future[Result]


class MicroBatcher(Generic[Item, Result]):
    """Bounded-wait micro-batching of ``submit`` calls into ``fn(list_of_items)``."""

    def __init__(
        self,
        fn: Callable[[list[Item]], Sequence[Result | BaseException]],
        *,
        max_batch_size: int = 64,
        max_wait_ms: float = 5.0,
        executor: Executor | None = None,
        size_of: Callable[[Item], int] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.size_of = size_of or (lambda _item: 1)
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="moerge-batcher")
        self._queue: asyncio.Queue[_Pending[Item, Result] | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.batches = 0  # batches executed so far
        self.items = 0  # items in them
        #: items per executed batch, the latest :data:`RECENT_BATCHES` (for tests and metrics;
        #: a serving coordinator runs batches for months)
        self.batch_sizes: list[int] = []

    # -- public -------------------------------------------------------------------------------
    async def submit(self, item: Item) -> Result:
        """Queue ``item``; return its result (or raise its error) once its batch has run."""
        if self._closed:
            raise BatcherClosed("the batcher is closed")
        queue = self._ensure_started()
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        queue.put_nowait(_Pending(item, max(1, int(self.size_of(item))), future))  # unbounded
        return await future

    async def aclose(self) -> None:
        """Stop accepting items, finish the queued ones, stop the collector and its thread."""
        if self._closed:
            return
        self._closed = True
        if self._queue is not None and self._task is not None:
            await self._queue.put(None)  # sentinel behind every queued item
            await self._task
        if self._own_executor:
            self._executor.shutdown(wait=True)

    async def __aenter__(self) -> MicroBatcher[Item, Result]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- collector ----------------------------------------------------------------------------
    def _ensure_started(self) -> asyncio.Queue[_Pending[Item, Result] | None]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._collect())
        return self._queue

    async def _collect(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        carry: _Pending[Item, Result] | None = None  # an item that did not fit the last batch
        stopping = False
        while True:
            if carry is not None:
                first, carry = carry, None
            elif stopping:
                break
            else:
                pending = await queue.get()
                if pending is None:
                    break
                first = pending
            batch, size = [first], first.size
            deadline = loop.time() + self.max_wait
            while size < self.max_batch_size and not stopping:
                if queue.empty():
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(queue.get(), timeout)
                    except asyncio.TimeoutError:
                        break
                else:
                    nxt = queue.get_nowait()
                if nxt is None:
                    stopping = True
                elif size + nxt.size > self.max_batch_size:
                    carry = nxt
                    break
                else:
                    batch.append(nxt)
                    size += nxt.size
            await self._run(batch)

    async def _run(self, batch: list[_Pending[Item, Result]]) -> None:
        live = [p for p in batch if not p.future.cancelled()]
        if not live:
            return
        self.batches += 1
        self.items += len(live)
        self.batch_sizes.append(len(live))
        if len(self.batch_sizes) > 2 * RECENT_BATCHES:
            del self.batch_sizes[:-RECENT_BATCHES]
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self.fn, [p.item for p in live])
            if len(results) != len(live):
                raise RuntimeError(
                    f"batch function returned {len(results)} results for {len(live)} items"
                )
        except Exception as exc:
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, result in zip(live, results, strict=True):
            if p.future.done():
                continue
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)
