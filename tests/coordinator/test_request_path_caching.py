"""The request path's registry caches: no database read while nothing changes, and a revoke, a
quarantine or a write by another process obeyed within the documented bound."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import event

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import upload_expert
from moerge.coordinator.services import registry_cache
from moerge.coordinator.services.registry_cache import GenerationCache
from moerge.storage.registry import Registry
from moerge.v1 import admin_pb2, admin_pb2_grpc, common_pb2, inference_pb2, inference_pb2_grpc
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator, bearer
from tests.coordinator.test_server import enroll
from tests.experts import make_expert_dir

# -- the cache itself ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_entry_holds_until_the_generation_moves() -> None:
    generation = [0]
    cache: GenerationCache[str] = GenerationCache(lambda: generation[0], clock=Clock())
    cache.put("k", "v", generation[0])
    assert cache.get("k") == "v"
    generation[0] += 1
    assert cache.get("k") is None


def test_an_entry_expires_after_its_max_age() -> None:
    clock = Clock()
    cache: GenerationCache[str] = GenerationCache(lambda: 0, max_age_seconds=1.0, clock=clock)
    cache.put("k", "v", 0)
    clock.now = 0.99
    assert cache.get("k") == "v"
    clock.now = 1.0
    assert cache.get("k") is None


def test_a_value_read_across_a_write_is_never_served() -> None:
    generation = [0]
    cache: GenerationCache[str] = GenerationCache(lambda: generation[0])

    def read_while_someone_writes() -> str:
        generation[0] += 1  # a write lands after the generation was read, before the put
        return "maybe stale"

    assert cache.get_or_read("k", read_while_someone_writes) == "maybe stale"
    assert cache.get("k") is None


def test_refusals_are_not_remembered_and_the_size_is_bounded() -> None:
    cache: GenerationCache[int] = GenerationCache(lambda: 0, max_entries=3)
    assert cache.get_or_read("none", lambda: None) is None
    assert cache.get("none") is None
    for i in range(10):
        cache.put(i, i, 0)
        assert len(cache._entries) <= 3


def test_every_registry_write_moves_the_generation(tmp_path: Path, tiny_bert: Path) -> None:
    with BackgroundCoordinator(coordinator_config(tmp_path / "data", tiny_bert)) as running:
        registry: Registry = running.state.registry
        before = registry.generation()
        registry.create_enrollment_token("test")
        assert registry.generation() > before


# -- through the real server ----------------------------------------------------------------


@pytest.fixture
def served(
    tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[BackgroundCoordinator, str, list[str]]]:
    """Two experts, a centroid router and a contributor credential; caches never age out."""
    monkeypatch.setattr(registry_cache, "MAX_AGE_SECONDS", 3600.0)
    config = coordinator_config(tmp_path / "data", tiny_bert, housekeeping_interval_seconds=0)
    with BackgroundCoordinator(config) as running:
        _, credential = enroll(running.address, running.admin_token(), "lab")
        target = Target(address=running.address, token=credential)
        ids = []
        for i in range(2):
            folder = make_expert_dir(tiny_bert, tmp_path / f"e{i}", seed=i, task_name=f"task{i}")
            ids.append(
                upload_expert(target, folder, f"e{i}", f"task{i}", progress=False).expert.expert_id
            )
        with grpc.insecure_channel(running.address) as channel:
            admin_pb2_grpc.AdminServiceStub(channel).TrainRouter(
                admin_pb2.TrainRouterRequest(method="centroid"),
                metadata=bearer(running.admin_token()),
            )
        yield running, credential, ids


def _predict(address: str, token: str, only: list[str] | None = None) -> list[str]:
    """The expert ids the prediction used."""
    with grpc.insecure_channel(address) as channel:
        response = inference_pb2_grpc.InferenceServiceStub(channel).Predict(
            inference_pb2.PredictRequest(inputs=["good film", "bank stock"], expert_ids=only),
            metadata=bearer(token),
        )
    return [e.expert_id for p in response.predictions for e in p.experts]


def test_repeated_predictions_read_no_database(served) -> None:
    running, credential, ids = served
    for only in ([], [ids[0]]):  # warm: the credential, the active experts, both router shapes
        _predict(running.address, credential, only)
    statements: list[str] = []
    listener = lambda *args: statements.append(args[2])  # noqa: E731  (conn, cursor, statement)
    event.listen(running.state.engine, "before_cursor_execute", listener)
    try:
        for only in ([], [ids[0]], [], [ids[0]]):
            _predict(running.address, credential, only)
    finally:
        event.remove(running.state.engine, "before_cursor_execute", listener)
    assert statements == []


def test_requests_restricted_alike_share_one_router(served) -> None:
    running, credential, ids = served
    _predict(running.address, credential)
    inference = running.state.inference
    first = running.run(inference.chosen("", 0, [ids[0]]))
    again = running.run(inference.chosen("", 0, [ids[0]]))
    other = running.run(inference.chosen("", 0, [ids[1]]))
    assert again.router is first.router  # one batch key: the batcher runs them together
    assert other.router is not first.router


def test_a_quarantine_is_obeyed_by_the_next_prediction(served) -> None:
    running, credential, (victim, other) = served
    assert victim in _predict(running.address, credential, [victim])  # cached as routable
    with grpc.insecure_channel(running.address) as channel:
        admin_pb2_grpc.AdminServiceStub(channel).SetExpertState(
            admin_pb2.SetExpertStateRequest(
                expert_id=victim, state=common_pb2.EXPERT_STATE_QUARANTINED, reason="test"
            ),
            metadata=bearer(running.admin_token()),
        )
    assert set(_predict(running.address, credential)) == {other}
    with pytest.raises(grpc.RpcError) as err:
        _predict(running.address, credential, [victim])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_revoked_contributor_is_refused_on_the_next_call(served) -> None:
    running, credential, _ = served
    _predict(running.address, credential)  # the credential is now remembered
    contributor = running.state.registry.authenticate(credential).contributor_id
    with grpc.insecure_channel(running.address) as channel:
        admin_pb2_grpc.AdminServiceStub(channel).RevokeContributor(
            admin_pb2.RevokeContributorRequest(contributor_id=contributor, reason="left"),
            metadata=bearer(running.admin_token()),
        )
    with pytest.raises(grpc.RpcError) as err:
        _predict(running.address, credential)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_write_by_another_process_is_seen_once_entries_age_out(served) -> None:
    running, credential, (victim, _) = served
    _predict(running.address, credential, [victim])
    # another coordinator on the same database: this process's generation does not move
    elsewhere = Registry(running.state.engine, running.state.blobs)
    elsewhere.set_expert_state("admin", victim, "quarantined", "from elsewhere")
    later = time.monotonic() + registry_cache.MAX_AGE_SECONDS
    for cache in (running.state.inference._active, running.state.inference._chosen):
        cache.clock = lambda: later  # the bound has passed
    with pytest.raises(grpc.RpcError) as err:
        _predict(running.address, credential, [victim])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
