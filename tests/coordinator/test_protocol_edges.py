"""Edges an outside client (written from the .proto files alone) ran into."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import upload_expert
from moerge.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.coordinator.harness import BackgroundCoordinator
from tests.coordinator.test_server import enroll
from tests.experts import make_expert_dir


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_the_bearer_scheme_is_case_insensitive(
    coordinator: BackgroundCoordinator, scheme: str
) -> None:
    """RFC 7235: the auth scheme is case-insensitive; ``bearer <token>`` was UNAUTHENTICATED."""
    metadata = (("authorization", f"{scheme} {coordinator.admin_token()}"),)
    with grpc.insecure_channel(coordinator.address) as channel:
        response = admin_pb2_grpc.AdminServiceStub(channel).ListContributors(
            admin_pb2.ListContributorsRequest(), metadata=metadata
        )
    assert list(response.contributors) == []


@pytest.mark.parametrize("rpc", ["Predict", "Route"])
def test_more_expert_ids_than_the_limit_are_refused(
    coordinator: BackgroundCoordinator, rpc: str
) -> None:
    request = getattr(inference_pb2, f"{rpc}Request")(
        inputs=["x"], expert_ids=[f"{i:032x}" for i in range(1025)]
    )
    metadata = (("authorization", f"Bearer {coordinator.admin_token()}"),)
    with grpc.insecure_channel(coordinator.address) as channel, pytest.raises(grpc.RpcError) as err:
        getattr(inference_pb2_grpc.InferenceServiceStub(channel), rpc)(request, metadata=metadata)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expert_ids" in err.value.details() and "1024" in err.value.details()


def test_a_contributor_name_outside_the_documented_characters_is_refused(
    coordinator: BackgroundCoordinator,
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        enroll(coordinator.address, coordinator.admin_token(), "x;DROP TABLE contributors")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "name" in err.value.details()


def test_predict_with_the_oracle_method_says_it_is_for_evaluation_only(
    coordinator: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path
) -> None:
    """It used to suggest `moerge admin router train --method oracle`."""
    _, credential = enroll(coordinator.address, coordinator.admin_token(), "lab")
    target = Target(address=coordinator.address, token=credential)
    upload_expert(target, make_expert_dir(tiny_bert, tmp_path / "e"), "e", "toy", progress=False)
    metadata = (("authorization", f"Bearer {coordinator.admin_token()}"),)
    with grpc.insecure_channel(coordinator.address) as channel, pytest.raises(grpc.RpcError) as err:
        inference_pb2_grpc.InferenceServiceStub(channel).Predict(
            inference_pb2.PredictRequest(inputs=["x"], routing_method="oracle"), metadata=metadata
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "evaluation only" in err.value.details()
    assert "router train" not in err.value.details()
