"""A generation stream whose reader falls behind sends the waiting text in one message."""

from __future__ import annotations

import asyncio
import threading

from moerge.coordinator.inference.generation.requests import (
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    TextDelta,
)
from moerge.coordinator.inference.generation.sampling import SamplingParams
from moerge.coordinator.inference.generation_service import _events, _mailbox


def finished() -> GenerationFinished:
    return GenerationFinished(
        finish_reason="length",
        prompt_tokens=2,
        completion_tokens=3,
        experts=(),
        confidence=1.0,
        time_to_first_token_ms=1.0,
        latency_ms=2.0,
    )


def test_text_waiting_behind_a_delta_is_joined_and_the_end_still_follows():
    async def read() -> list[GenerationEvent]:
        queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        for event in (TextDelta("Hel", 1), TextDelta("lo", 1), TextDelta(" you", 1), finished()):
            queue.put_nowait(event)
        request = GenerationRequest(
            prompt="p", routing_text="p", sampling=SamplingParams(), sink=queue.put_nowait
        )
        return [event async for event in _events(request, queue)]

    events = asyncio.run(read())
    assert events[0] == TextDelta("Hello you", 3)
    assert isinstance(events[1], GenerationFinished) and len(events) == 2


def test_a_delta_read_as_soon_as_it_is_produced_is_sent_alone():
    async def read() -> list[GenerationEvent]:
        queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        request = GenerationRequest(
            prompt="p", routing_text="p", sampling=SamplingParams(), sink=queue.put_nowait
        )
        out = []
        stream = _events(request, queue)
        for event in (TextDelta("a", 1), TextDelta("b", 1)):
            queue.put_nowait(event)
            out.append(await anext(stream))
        queue.put_nowait(finished())
        out.append(await anext(stream))
        return out

    events = asyncio.run(read())
    assert events[:2] == [TextDelta("a", 1), TextDelta("b", 1)]


def test_events_posted_from_another_thread_arrive_in_order_with_one_wake_up_per_burst():
    async def read() -> tuple[list[GenerationEvent], int]:
        loop = asyncio.get_running_loop()
        box = _mailbox(loop)
        wakeups = 0
        drain = box._drain

        def counted() -> None:
            nonlocal wakeups
            wakeups += 1
            drain()

        box._drain = counted  # type: ignore[method-assign]
        queues = [asyncio.Queue(), asyncio.Queue()]

        def produce() -> None:  # one decode step's events for two streams, then the ends
            for i in range(3):
                for q in queues:
                    box.post(q, TextDelta(str(i), 1))
            for q in queues:
                box.post(q, finished())

        producer = threading.Thread(target=produce)
        producer.start()
        producer.join()  # the loop is blocked meanwhile, as it is while it writes to clients
        got = []
        for q in queues:
            while not isinstance(event := await q.get(), GenerationFinished):
                got.append(event)
        return got, wakeups

    events, wakeups = asyncio.run(read())
    assert [e.text for e in events] == ["0", "1", "2"] * 2
    assert wakeups == 1  # the whole burst waited for one drain
