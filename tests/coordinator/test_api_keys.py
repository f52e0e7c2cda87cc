"""User API keys through the real gRPC server: inference only, revocable at once, expiring, and
rate limited per key (RESOURCE_EXHAUSTED with ``retry-after``); enrollment tokens list/revoke."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from moerge.client import Client
from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import upload_expert
from moerge.coordinator.interceptors import rate_limit
from moerge.errors import MoergeError
from moerge.v1 import contributor_pb2, contributor_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator, bearer
from tests.coordinator.test_server import enroll
from tests.experts import make_expert_dir

TEXTS = ["the film was great"]


def _with_expert(running: BackgroundCoordinator, tiny_bert: Path, root: Path) -> None:
    _, credential = enroll(running.address, running.admin_token(), "lab")
    folder = make_expert_dir(tiny_bert, root / "e0", seed=3, labels=("neg", "pos"))
    upload_expert(Target(running.address, credential), folder, "e0", "toy", progress=False)


def _refusal(call: object) -> MoergeError:
    with pytest.raises(MoergeError) as refused:
        call()  # type: ignore[operator]
    return refused.value


def test_a_user_key_may_predict_and_route_but_not_upload_or_administer(
    coordinator: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path
) -> None:
    _with_expert(coordinator, tiny_bert, tmp_path)
    with Client(coordinator.address, token=coordinator.admin_token()) as admin:
        created = admin.create_api_key(note="app", ttl_seconds=3600)
        assert created.api_key.startswith("mgu_") and created.key.expires_at is not None
        with Client(coordinator.address, token=created.api_key) as user:
            assert user.predict(TEXTS).predictions[0].output in ("neg", "pos")
            assert len(user.route(TEXTS).decisions) == 1
            # Generate is allowed too: refused for what the coordinator serves, not for the role
            generate = _refusal(lambda: list(user.generate("hello")))
            assert generate.code == grpc.StatusCode.FAILED_PRECONDITION
            for forbidden in (user.my_experts, user.base_model, user.list_experts,
                              lambda: user.create_api_key()):  # fmt: skip
                assert _refusal(forbidden).code == grpc.StatusCode.PERMISSION_DENIED
        (listed,) = admin.list_api_keys().items
        assert listed.key_id == created.key.key_id and listed.note == "app"
        assert listed.last_used_at is not None and not listed.revoked
    with grpc.insecure_channel(coordinator.address) as channel:
        stream = iter([contributor_pb2.UploadExpertRequest()])
        with pytest.raises(grpc.RpcError) as upload:
            contributor_pb2_grpc.ContributorServiceStub(channel).UploadExpert(
                stream, metadata=bearer(created.api_key)
            )
    assert upload.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_revoked_or_expired_key_is_refused_on_the_very_next_request(
    coordinator: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path
) -> None:
    _with_expert(coordinator, tiny_bert, tmp_path)
    with Client(coordinator.address, token=coordinator.admin_token()) as admin:
        revoked = admin.create_api_key()
        expiring = admin.create_api_key(ttl_seconds=1)
        with Client(coordinator.address, token=revoked.api_key) as user:
            user.route(TEXTS)  # accepted, and remembered by the auth cache
            assert admin.revoke_api_key(revoked.key.key_id).revoked
            assert _refusal(lambda: user.route(TEXTS)).code == grpc.StatusCode.UNAUTHENTICATED
        assert _refusal(lambda: admin.revoke_api_key(revoked.key.key_id)).code == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        with Client(coordinator.address, token=expiring.api_key) as user:
            user.route(TEXTS)
            assert expiring.key.expires_at is not None
            time.sleep(max(0.0, expiring.key.expires_at.timestamp() - time.time()) + 0.05)
            assert _refusal(lambda: user.route(TEXTS)).code == grpc.StatusCode.UNAUTHENTICATED
        active = admin.list_api_keys(exclude_revoked=True).items
        assert [k.key_id for k in active] == [expiring.key.key_id]


def test_inference_beyond_a_keys_rate_limit_is_resource_exhausted_with_retry_after(
    tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    offset = [0.0]
    monkeypatch.setattr(rate_limit, "now", lambda: time.monotonic() + offset[0])
    config = coordinator_config(tmp_path / "data", tiny_bert, inference_requests_per_minute=2)
    with BackgroundCoordinator(config) as running:
        _with_expert(running, tiny_bert, tmp_path)
        with Client(running.address, token=running.admin_token()) as admin:
            own = admin.create_api_key(rate_limit_per_minute=1).api_key
            default = admin.create_api_key().api_key
        with grpc.insecure_channel(running.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)

            def route(key: str) -> None:
                stub.Route(inference_pb2.RouteRequest(inputs=TEXTS), metadata=bearer(key))

            route(own)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Predict(inference_pb2.PredictRequest(inputs=TEXTS), metadata=bearer(own))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "1 requests per minute" in refused.value.details()
            retry_after = int(dict(refused.value.trailing_metadata())["retry-after"])
            assert 1 <= retry_after <= 60  # one request refills in a minute
            route(default)  # each key has its own bucket, of the configured default size
            route(default)
            with pytest.raises(grpc.RpcError) as third:
                route(default)
            assert third.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            offset[0] += retry_after
            route(own)
        metrics = running.running.metrics
        assert metrics.requests("/moerge.v1.InferenceService/Predict", "RESOURCE_EXHAUSTED") == 1


def test_enrollment_tokens_expire_by_default_and_can_be_listed_and_revoked(
    coordinator: BackgroundCoordinator,
) -> None:
    with Client(coordinator.address, token=coordinator.admin_token()) as admin:
        created = admin.create_enrollment_token(note="lab")
        assert created.expires_at is not None  # enrollment_token_ttl_days: 7 by default
        days = (created.expires_at.timestamp() - time.time()) / 86400
        assert 6.9 < days <= 7
        forever = admin.create_enrollment_token(ttl_seconds=60)
        (first, second) = admin.list_enrollment_tokens().items
        assert (first.token_id, first.note, first.uses, first.revoked) == (
            created.token_id, "lab", 0, False,
        )  # fmt: skip
        assert second.token_id == forever.token_id
        assert admin.revoke_enrollment_token(created.token_id).revoked
        assert [t.token_id for t in admin.list_enrollment_tokens(exclude_revoked=True).items] == [
            forever.token_id
        ]
        with Client(coordinator.address) as anyone:
            refused = _refusal(lambda: anyone.join(created.token, "mallory", save=False))
        assert refused.code == grpc.StatusCode.UNAUTHENTICATED
