"""``predict_process = true``: Predict's model in a process of its own, answering exactly as the
in-process engine does, obeying the registry as the front sees it, and surviving its death."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import upload_expert
from moerge.v1 import admin_pb2, admin_pb2_grpc, common_pb2, inference_pb2, inference_pb2_grpc
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator, bearer
from tests.coordinator.test_server import enroll
from tests.experts import make_expert_dir

TEXTS = ["the film was great", "the bank stock fell", "a dull match"]


@pytest.fixture
def pair(
    tmp_path: Path, tiny_bert: Path, db_url: str
) -> Iterator[tuple[BackgroundCoordinator, ...]]:
    """Two coordinators over the same experts: the engine in-process (SQLite), and in its own
    process, whose registry is SQLite in one run and PostgreSQL in the other."""
    folders = [
        make_expert_dir(tiny_bert, tmp_path / f"e{i}", labels=labels, seed=i, task_name=f"t{i}")
        for i, labels in enumerate((("neg", "pos"), ("sport", "tech", "money"), ("neg", "pos")))
    ]
    running = []
    try:
        for name, separate, url in (("inline", False, ""), ("process", True, db_url)):
            config = coordinator_config(tmp_path / name, tiny_bert, url, predict_process=separate)
            coordinator = BackgroundCoordinator(config).__enter__()
            running.append(coordinator)
            _, credential = enroll(coordinator.address, coordinator.admin_token(), "lab")
            target = Target(address=coordinator.address, token=credential)
            for i, folder in enumerate(folders):
                upload_expert(target, folder, f"expert{i}", f"t{i}", progress=False)
        yield tuple(running)
    finally:
        for coordinator in running:
            coordinator.__exit__(None, None, None)


def predict(coordinator: BackgroundCoordinator, **fields: object) -> inference_pb2.PredictResponse:
    with grpc.insecure_channel(coordinator.address) as channel:
        return inference_pb2_grpc.InferenceServiceStub(channel).Predict(
            inference_pb2.PredictRequest(inputs=TEXTS, **fields),
            metadata=bearer(coordinator.admin_token()),
            timeout=120,
        )


def answers(response: inference_pb2.PredictResponse) -> list[tuple[object, ...]]:
    """What a caller sees, expert ids replaced by names (the two registries' ids differ)."""
    return [
        (
            p.output,
            round(p.confidence, 5),
            tuple((e.expert_name, round(e.weight, 5)) for e in p.experts),
        )
        for p in response.predictions
    ]


def train(coordinator: BackgroundCoordinator, method: str) -> int:
    with grpc.insecure_channel(coordinator.address) as channel:
        return (
            admin_pb2_grpc.AdminServiceStub(channel)
            .TrainRouter(
                admin_pb2.TrainRouterRequest(method=method),
                metadata=bearer(coordinator.admin_token()),
                timeout=120,
            )
            .version
        )


def expert_id(coordinator: BackgroundCoordinator, name: str) -> str:
    return next(e.id for e in coordinator.state.registry.active_experts() if e.name == name)


def test_engine_process_answers_as_the_engine_in_process_does(
    pair: tuple[BackgroundCoordinator, BackgroundCoordinator],
) -> None:
    inline, process = pair
    # the on-the-fly fallback router, then a trained one, then ensembles and merges of two
    assert answers(predict(inline)) == answers(predict(process))
    assert train(inline, "centroid") == train(process, "centroid")
    for fields in (
        {},
        {"top_k": 2},
        {"top_k": 2, "aggregation": inference_pb2.AGGREGATION_MERGE_LINEAR},
    ):
        got, want = predict(process, **fields), predict(inline, **fields)
        assert answers(got) == answers(want)
        assert got.router_version == want.router_version and got.routing_method == "centroid"
    only = predict(process, expert_ids=[expert_id(process, "expert1")])
    assert {e.expert_name for p in only.predictions for e in p.experts} == {"expert1 v1"}
    assert answers(only) == answers(predict(inline, expert_ids=[expert_id(inline, "expert1")]))
    batcher = process.state.inference.batcher
    assert batcher.batches >= 5 and process.state.inference.engine_process.starts == 1
    # the experts were loaded in the engine process; /metrics reads these sums
    front = process.state.inference.engine.cache.stats()
    total = process.state.inference.cache_stats()
    assert front["loads"] == 0 and total["loads"] >= 2  # the experts these texts routed to
    assert total["resident"] == total["loads"]  # nothing evicted
    assert total["budget_bytes"] == 2 * front["budget_bytes"]  # two caches, one budget each


def test_engine_process_obeys_a_quarantine_in_the_next_request(
    pair: tuple[BackgroundCoordinator, BackgroundCoordinator],
) -> None:
    _, process = pair
    train(process, "centroid")
    before = predict(process, top_k=3)
    assert {e.expert_name for p in before.predictions for e in p.experts} >= {"expert0 v1"}
    quarantined = expert_id(process, "expert0")
    with grpc.insecure_channel(process.address) as channel:
        admin_pb2_grpc.AdminServiceStub(channel).SetExpertState(
            admin_pb2.SetExpertStateRequest(
                expert_id=quarantined, state=common_pb2.EXPERT_STATE_QUARANTINED, reason="test"
            ),
            metadata=bearer(process.admin_token()),
        )
    after = predict(process, top_k=2)
    assert "expert0 v1" not in {e.expert_name for p in after.predictions for e in p.experts}
    with pytest.raises(grpc.RpcError) as refused:  # the front refuses it, as in-process
        predict(process, expert_ids=[quarantined])
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_refusals_raised_in_the_engine_process_keep_their_status(
    pair: tuple[BackgroundCoordinator, BackgroundCoordinator],
) -> None:
    process = pair[1]
    for coordinator in pair:
        with pytest.raises(grpc.RpcError) as refused:  # top_k over the experts: the engine's
            predict(coordinator, top_k=9)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "top_k" in refused.value.details()
    assert process.state.inference.engine_process.starts == 1


def test_a_killed_engine_process_fails_one_batch_and_is_started_again(
    pair: tuple[BackgroundCoordinator, BackgroundCoordinator],
) -> None:
    _, process = pair
    first = predict(process)
    engine = process.state.inference.engine_process
    os.kill(engine.pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as failed:
        predict(process)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    loads = process.state.inference.cache_stats()["loads"]
    assert answers(predict(process)) == answers(first)
    assert engine.starts == 2
    # the new engine process loads the experts again; the dead one's loads still count
    assert process.state.inference.cache_stats()["loads"] > loads
