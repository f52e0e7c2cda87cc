"""Router versions at the coordinator: refused fits keep the old router; changes trigger refits."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import upload_expert
from moerge.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator, bearer
from tests.coordinator.test_server import enroll
from tests.experts import make_expert_dir


def _upload(running: BackgroundCoordinator, tiny_bert: Path, tmp: Path, count: int) -> None:
    _, credential = enroll(running.address, running.admin_token(), f"lab{count}")
    target = Target(address=running.address, token=credential)
    for i in range(count):
        folder = make_expert_dir(
            tiny_bert, tmp / f"e{count}-{i}", seed=10 * count + i, task_name=f"task{i}"
        )
        upload_expert(target, folder, f"expert{i}", f"task{i}", progress=False)


def test_a_fit_refused_for_its_params_records_nothing_and_the_previous_router_stays_active(
    tmp_path: Path, tiny_bert: Path
) -> None:
    with BackgroundCoordinator(coordinator_config(tmp_path / "d", tiny_bert)) as running:
        _upload(running, tiny_bert, tmp_path, 2)
        with grpc.insecure_channel(running.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            auth = bearer(running.admin_token())
            good = admin.TrainRouter(admin_pb2.TrainRouterRequest(method="lda"), metadata=auth)
            for params, named in (
                ('{"no_such_parameter": 1}', "no_such_parameter"),
                ('{"top_k": 5}', "top_k"),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    admin.TrainRouter(
                        admin_pb2.TrainRouterRequest(method="lda", params_json=params),
                        metadata=auth,
                    )
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert named in err.value.details()
            versions = admin.ListRouterVersions(
                admin_pb2.ListRouterVersionsRequest(), metadata=auth
            ).versions
        assert [v.version for v in versions] == [good.version]
        assert [v.version for v in versions if v.active] == [good.version]
        assert running.state.routers.active.version.version == good.version


def test_new_and_quarantined_experts_trigger_a_refit_after_the_debounce(
    tmp_path: Path, tiny_bert: Path
) -> None:
    config = coordinator_config(
        tmp_path / "d",
        tiny_bert,
        auto_retrain=True,
        retrain_debounce_seconds=0.5,
        retrain_interval_seconds=3600,
    )
    with BackgroundCoordinator(config) as running:
        _upload(running, tiny_bert, tmp_path, 2)
        registry = running.state.registry
        first = _wait_for_version(registry, lambda v: len(v.expert_ids) == 2)
        assert first.trigger == "expert_change" and first.active
        victim = first.expert_ids[0]
        with grpc.insecure_channel(running.address) as channel:
            admin_pb2_grpc.AdminServiceStub(channel).SetExpertState(
                admin_pb2.SetExpertStateRequest(
                    expert_id=victim, reason="test", state=common_pb2.EXPERT_STATE_QUARANTINED
                ),
                metadata=bearer(running.admin_token()),
            )
        second = _wait_for_version(registry, lambda v: v.version > first.version)
        assert victim not in second.expert_ids and second.active


def _wait_for_version(registry, accept, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        active = registry.active_router_version()
        if active is not None and active.status == "ready" and accept(active):
            return active
        time.sleep(0.2)
    raise AssertionError("no router version was fitted in time")


def test_an_admins_router_method_persists_across_scheduled_refits(
    tmp_path: Path, tiny_bert: Path
) -> None:
    """``router train --method arrow`` was replaced by the default (centroid) at the next refit."""
    config = coordinator_config(
        tmp_path / "d",
        tiny_bert,
        auto_retrain=True,
        router_method="lda",
        retrain_debounce_seconds=0.5,
        retrain_interval_seconds=3600,
    )
    with BackgroundCoordinator(config) as running:
        _upload(running, tiny_bert, tmp_path, 2)
        registry = running.state.registry
        _wait_for_version(registry, lambda v: len(v.expert_ids) == 2)
        with grpc.insecure_channel(running.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            auth = bearer(running.admin_token())
            chosen = admin.TrainRouter(
                admin_pb2.TrainRouterRequest(method="centroid", params_json='{"top_k": 1}'),
                metadata=auth,
            )
            admin.SetExpertState(
                admin_pb2.SetExpertStateRequest(
                    expert_id=chosen.expert_ids[0],
                    reason="test",
                    state=common_pb2.EXPERT_STATE_QUARANTINED,
                ),
                metadata=auth,
            )
        refit = _wait_for_version(registry, lambda v: v.version > chosen.version)
        assert refit.trigger == "expert_change"
        assert (refit.method, refit.params) == ("centroid", {"top_k": 1})


@pytest.mark.parametrize(
    ("method", "why"), [("oracle", "evaluation only"), ("base", "routes to no expert")]
)
def test_a_router_that_cannot_serve_classification_is_not_activated(
    tmp_path: Path, tiny_bert: Path, method: str, why: str
) -> None:
    with BackgroundCoordinator(coordinator_config(tmp_path / "d", tiny_bert)) as running:
        _upload(running, tiny_bert, tmp_path, 2)
        with grpc.insecure_channel(running.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            auth = bearer(running.admin_token())
            with pytest.raises(grpc.RpcError) as err:
                admin.TrainRouter(admin_pb2.TrainRouterRequest(method=method), metadata=auth)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert why in err.value.details()
            assert running.state.registry.active_router_version() is None
            if method == "base":  # for evaluation, without activating, it still trains
                info = admin.TrainRouter(
                    admin_pb2.TrainRouterRequest(method=method, no_activate=True), metadata=auth
                )
                assert info.status == "ready" and not info.active


def test_list_contributors_counts_each_contributors_experts(
    tmp_path: Path, tiny_bert: Path
) -> None:
    with BackgroundCoordinator(coordinator_config(tmp_path / "d", tiny_bert)) as running:
        _upload(running, tiny_bert, tmp_path, 2)
        _upload(running, tiny_bert, tmp_path, 1)
        enroll(running.address, running.admin_token(), "idle")
        with grpc.insecure_channel(running.address) as channel:
            listed = (
                admin_pb2_grpc.AdminServiceStub(channel)
                .ListContributors(
                    admin_pb2.ListContributorsRequest(), metadata=bearer(running.admin_token())
                )
                .contributors
            )
    assert {c.name: c.expert_count for c in listed} == {"lab2": 2, "lab1": 1, "idle": 0}


@pytest.mark.parametrize("params", ['{"top_k": ' + "9" * 5000 + "}", "[" * 100_000])
def test_router_params_json_python_cannot_read_is_invalid_argument(
    tmp_path: Path, tiny_bert: Path, params: str
) -> None:
    with (
        BackgroundCoordinator(coordinator_config(tmp_path / "d", tiny_bert)) as running,
        grpc.insecure_channel(running.address) as channel,
        pytest.raises(grpc.RpcError) as err,
    ):
        admin_pb2_grpc.AdminServiceStub(channel).TrainRouter(
            admin_pb2.TrainRouterRequest(method="centroid", params_json=params),
            metadata=bearer(running.admin_token()),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "params_json" in err.value.details()
