"""Client.generate and AsyncClient.generate: streamed events from a causal-LM coordinator."""

from __future__ import annotations

import asyncio

import grpc
import pytest

import moerge
from moerge.results import GenerateDelta, GenerateEnd, GenerateStart
from tests.coordinator.conftest import tiny_llama  # noqa: F401 (fixture)
from tests.coordinator.harness import BackgroundCoordinator
from tests.coordinator.test_generate import served  # noqa: F401 (fixture)


def test_generate_streams_start_deltas_end_as_dataclasses(served: BackgroundCoordinator) -> None:  # noqa: F811
    with moerge.Client(served.address, token=served.admin_token()) as client:
        events = list(client.generate("the film was", max_new_tokens=6, seed=3, temperature=0.7))
        again = list(client.generate("the film was", max_new_tokens=6, seed=3, temperature=0.7))
        chat = list(client.generate(messages=[{"role": "user", "content": "hello"}]))
    start, *deltas, end = events
    assert isinstance(start, GenerateStart) and isinstance(end, GenerateEnd)
    assert all(isinstance(d, GenerateDelta) for d in deltas)
    assert start.experts[0].expert_name.startswith("lm") and start.prompt_tokens > 0
    assert end.finish_reason in ("stop", "length") and end.completion_tokens <= 6
    assert sum(d.tokens for d in deltas) == end.completion_tokens
    assert "".join(d.text for d in deltas) == "".join(
        e.text for e in again if isinstance(e, GenerateDelta)
    )  # same seed, same text
    assert isinstance(chat[0], GenerateStart) and isinstance(chat[-1], GenerateEnd)


def test_generate_refusals_are_moerge_errors(served: BackgroundCoordinator) -> None:  # noqa: F811
    with moerge.Client(served.address, token=served.admin_token()) as client:
        with pytest.raises(moerge.MoergeError, match="exactly one of prompt and messages"):
            list(client.generate())
        with pytest.raises(moerge.MoergeError) as bad:
            list(client.generate("x", temperature=-1.0))
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_leaving_the_loop_early_ends_the_call(served: BackgroundCoordinator) -> None:  # noqa: F811
    with moerge.Client(served.address, token=served.admin_token()) as client:
        stream = client.generate("the film was", max_new_tokens=8)
        first = next(stream)
        stream.close()  # cancels the RPC
        assert isinstance(first, GenerateStart)
        assert isinstance(list(client.generate("again", max_new_tokens=2))[-1], GenerateEnd)


def test_async_generate_is_an_async_iterator(served: BackgroundCoordinator) -> None:  # noqa: F811
    async def collect() -> list:
        async with moerge.AsyncClient(served.address, token=served.admin_token()) as client:
            return [e async for e in client.generate("the film was", max_new_tokens=4)]

    events = asyncio.run(collect())
    assert isinstance(events[0], GenerateStart) and isinstance(events[-1], GenerateEnd)


def test_generate_on_a_classification_coordinator_is_a_failed_precondition(
    running: BackgroundCoordinator,
) -> None:
    client = moerge.Client(running.address, token=running.admin_token())
    with client, pytest.raises(moerge.MoergeError) as refused:
        list(client.generate("hello"))
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
