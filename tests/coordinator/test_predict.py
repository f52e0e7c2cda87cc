"""Routed predictions through the real server: routers, fallbacks, restrictions, bad input."""

from __future__ import annotations

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


@pytest.fixture
def served(tmp_path: Path, tiny_bert: Path) -> BackgroundCoordinator:
    """A coordinator (SQLite) with two uploaded experts of different label sets."""
    config = coordinator_config(tmp_path / "data", tiny_bert)
    with BackgroundCoordinator(config) as running:
        _, credential = enroll(running.address, running.admin_token(), "lab")
        target = Target(address=running.address, token=credential)
        for i, labels in enumerate((("neg", "pos"), ("sport", "tech", "money"))):
            folder = make_expert_dir(
                tiny_bert, tmp_path / f"e{i}", labels=labels, seed=i, task_name=f"task{i}"
            )
            upload_expert(target, folder, f"expert{i}", f"task{i}", progress=False)
        yield running


def _admin(running: BackgroundCoordinator) -> tuple[grpc.Channel, tuple[tuple[str, str], ...]]:
    return grpc.insecure_channel(running.address), bearer(running.admin_token())


def test_predict_without_a_router_falls_back_to_centroid_and_says_so(
    served: BackgroundCoordinator,
) -> None:
    channel, auth = _admin(served)
    with channel:
        response = inference_pb2_grpc.InferenceServiceStub(channel).Predict(
            inference_pb2.PredictRequest(inputs=["the film was great", "the bank stock fell"]),
            metadata=auth,
        )
    assert response.router_version == 0
    assert "no router trained yet" in response.note
    assert response.routing_method == "centroid"
    for prediction in response.predictions:
        assert len(prediction.experts) == 1
        assert prediction.output in {"neg", "pos", "sport", "tech", "money"}
        assert prediction.expert_outputs[0].scores


def test_trained_router_is_used_and_versions_roll_back(served: BackgroundCoordinator) -> None:
    channel, auth = _admin(served)
    with channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        first = admin.TrainRouter(admin_pb2.TrainRouterRequest(method="centroid"), metadata=auth)
        second = admin.TrainRouter(admin_pb2.TrainRouterRequest(method="lda"), metadata=auth)
        assert first.status == second.status == "ready" and second.active
        inference = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.PredictRequest(inputs=["great film"])
        assert inference.Predict(request, metadata=auth).router_version == second.version
        admin.ActivateRouterVersion(
            admin_pb2.ActivateRouterVersionRequest(version=first.version), metadata=auth
        )
        response = inference.Predict(request, metadata=auth)
        assert response.router_version == first.version
        assert response.routing_method == "centroid"
        versions = admin.ListRouterVersions(
            admin_pb2.ListRouterVersionsRequest(), metadata=auth
        ).versions
        assert [v.active for v in versions if v.version == first.version] == [True]


def test_quarantined_experts_receive_no_traffic(served: BackgroundCoordinator) -> None:
    channel, auth = _admin(served)
    with channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        admin.TrainRouter(admin_pb2.TrainRouterRequest(method="centroid"), metadata=auth)
        experts = admin.ListExperts(admin_pb2.ListExpertsRequest(), metadata=auth).experts
        victim = experts[0].expert_id
        admin.SetExpertState(
            admin_pb2.SetExpertStateRequest(
                expert_id=victim, state=common_pb2.EXPERT_STATE_QUARANTINED, reason="test"
            ),
            metadata=auth,
        )
        inference = inference_pb2_grpc.InferenceServiceStub(channel)
        texts = [f"text number {i} good bad film bank" for i in range(12)]
        response = inference.Predict(inference_pb2.PredictRequest(inputs=texts), metadata=auth)
        used = {e.expert_id for p in response.predictions for e in p.experts}
        assert victim not in used
        with pytest.raises(grpc.RpcError) as err:
            inference.Predict(
                inference_pb2.PredictRequest(inputs=["x"], expert_ids=[victim]), metadata=auth
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "quarantined" in err.value.details()


def test_bad_prediction_requests_get_clear_statuses(served: BackgroundCoordinator) -> None:
    channel, auth = _admin(served)
    with channel:
        inference = inference_pb2_grpc.InferenceServiceStub(channel)
        cases = [
            (inference_pb2.PredictRequest(), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
            (
                inference_pb2.PredictRequest(inputs=["x" * 30_000]),
                grpc.StatusCode.INVALID_ARGUMENT,
                "characters",
            ),
            (
                inference_pb2.PredictRequest(inputs=["x"], top_k=5),
                grpc.StatusCode.INVALID_ARGUMENT,
                "top_k",
            ),
            (
                inference_pb2.PredictRequest(inputs=["x"], routing_method="nonsense"),
                grpc.StatusCode.INVALID_ARGUMENT,
                "known: ",
            ),
            (
                inference_pb2.PredictRequest(inputs=["x"], routing_method="qda"),
                grpc.StatusCode.FAILED_PRECONDITION,
                "no trained router",
            ),
            (
                inference_pb2.PredictRequest(inputs=["x"], router_version=77),
                grpc.StatusCode.NOT_FOUND,
                "77",
            ),
            (
                inference_pb2.PredictRequest(inputs=["x"], aggregation=99),
                grpc.StatusCode.INVALID_ARGUMENT,
                "aggregation",
            ),
            (
                inference_pb2.PredictRequest(inputs=["x"], expert_ids=["f" * 32]),
                grpc.StatusCode.NOT_FOUND,
                "f" * 32,
            ),
        ]
        for request, code, text in cases:
            with pytest.raises(grpc.RpcError) as err:
                inference.Predict(request, metadata=auth)
            assert err.value.code() == code, (request, err.value.details())
            assert text in err.value.details(), err.value.details()


def test_predict_with_no_experts_is_failed_precondition(tmp_path: Path, tiny_bert: Path) -> None:
    with BackgroundCoordinator(coordinator_config(tmp_path / "d", tiny_bert)) as running:
        with grpc.insecure_channel(running.address) as channel, pytest.raises(grpc.RpcError) as err:
            inference_pb2_grpc.InferenceServiceStub(channel).Predict(
                inference_pb2.PredictRequest(inputs=["x"]), metadata=bearer(running.admin_token())
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_route_returns_decisions_without_running_experts(served: BackgroundCoordinator) -> None:
    channel, auth = _admin(served)
    with channel:
        response = inference_pb2_grpc.InferenceServiceStub(channel).Route(
            inference_pb2.RouteRequest(inputs=["a", "b", "c"], top_k=2), metadata=auth
        )
    assert len(response.decisions) == 3
    for decision in response.decisions:
        weights = [e.weight for e in decision.experts]
        assert len(weights) == 2 and abs(sum(weights) - 1) < 1e-5
        assert all(e.expert_name.startswith("expert") for e in decision.experts)
