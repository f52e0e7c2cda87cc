"""Generate's request path reads no database while nothing changes, as Predict's does: a burst
of streams that name a routing method does not each list the router versions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event

from moerge.v1 import admin_pb2, admin_pb2_grpc, inference_pb2
from tests.coordinator.causal_lm import causal_lm_coordinator
from tests.coordinator.harness import BackgroundCoordinator, bearer, channel
from tests.coordinator.test_generate import events
from tests.coordinator.test_incremental_router import wait_for


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path
) -> Iterator[BackgroundCoordinator]:
    """A causal-LM coordinator with two experts and a trained centroid router."""
    with causal_lm_coordinator(tmp_path_factory.mktemp("generate-path"), tiny_llama) as running:
        with channel(running.address) as ch:
            admin_pb2_grpc.AdminServiceStub(ch).TrainRouter(
                admin_pb2.TrainRouterRequest(method="centroid"),
                metadata=bearer(running.admin_token()),
            )

        def fitted() -> bool:
            active = running.state.registry.active_router_version()
            return active is not None and active.status == "ready"

        wait_for(fitted, 60)
        yield running


def test_repeated_generations_naming_a_method_read_no_database(trained) -> None:
    request = inference_pb2.GenerateRequest(prompt="the film was", routing_method="centroid")
    warm = events(trained, request)  # remembers the credential and the request's router
    assert warm[0].start.routing_method == "centroid" and warm[0].start.router_version >= 1
    statements: list[str] = []
    listener = lambda *args: statements.append(args[2])  # noqa: E731  (conn, cursor, statement)
    event.listen(trained.state.engine, "before_cursor_execute", listener)
    try:
        for _ in range(3):
            got = events(trained, request)
            assert got[-1].WhichOneof("event") == "end"
    finally:
        event.remove(trained.state.engine, "before_cursor_execute", listener)
    assert statements == []
