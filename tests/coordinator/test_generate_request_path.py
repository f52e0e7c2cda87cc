"""Generate's request path reads no database while nothing changes, as Predict's does: a burst
of streams that name a routing method does not each list the router versions."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import upload_expert
from moerge.v1 import admin_pb2, admin_pb2_grpc, inference_pb2
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator, bearer, channel
from tests.coordinator.test_generate import events
from tests.coordinator.test_server import enroll
from tests.experts import make_expert_dir


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path
) -> Iterator[BackgroundCoordinator]:
    """A causal-LM coordinator with two experts and a trained centroid router."""
    root = tmp_path_factory.mktemp("generate-path")
    config = coordinator_config(
        root / "data",
        tiny_llama,
        base_model_id="tiny-llama",
        task_type="causal_lm",
        target_modules=("q_proj", "v_proj"),
        max_input_tokens=32,
        max_new_tokens=4,
    )
    with BackgroundCoordinator(config) as running:
        _, credential = enroll(running.address, running.admin_token(), "lab")
        target = Target(address=running.address, token=credential)
        for i in range(2):
            folder = make_expert_dir(
                tiny_llama, root / f"lm{i}", rank=4, seed=i, task_type="causal_lm"
            )
            upload_expert(target, folder, f"lm{i}", f"task{i}", progress=False)
        with channel(running.address) as ch:
            admin_pb2_grpc.AdminServiceStub(ch).TrainRouter(
                admin_pb2.TrainRouterRequest(method="centroid"),
                metadata=bearer(running.admin_token()),
            )
        deadline = time.monotonic() + 60
        while (active := running.state.registry.active_router_version()) is None or (
            active.status != "ready"
        ):
            assert time.monotonic() < deadline, "the router was not fitted in time"
            time.sleep(0.2)
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
