"""A new expert joins an incremental (Arrow) router at once, as a new version, without a refit;
a removed expert still waits for the scheduler's full refit."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import upload_expert
from moerge.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator, bearer
from tests.coordinator.test_server import enroll
from tests.experts import make_expert_dir


def active_version(running: BackgroundCoordinator) -> admin_pb2.RouterVersion:
    with grpc.insecure_channel(running.address) as channel:
        versions = (
            admin_pb2_grpc.AdminServiceStub(channel)
            .ListRouterVersions(
                admin_pb2.ListRouterVersionsRequest(), metadata=bearer(running.admin_token())
            )
            .versions
        )
    return next(v for v in versions if v.active)


def wait_for(predicate, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_an_uploaded_expert_joins_the_active_arrow_router_without_a_refit(
    tmp_path: Path, tiny_llama: Path
) -> None:
    config = coordinator_config(
        tmp_path / "data",
        tiny_llama,
        base_model_id="tiny-llama",
        task_type="causal_lm",
        target_modules=("q_proj", "v_proj"),
        max_input_tokens=32,
        auto_retrain=True,
        retrain_debounce_seconds=3600,
        retrain_interval_seconds=3600,
        consistency_checks=False,
    )
    with BackgroundCoordinator(config) as running:
        _, credential = enroll(running.address, running.admin_token(), "lab")
        target = Target(address=running.address, token=credential)

        def upload(i: int) -> str:
            folder = make_expert_dir(
                tiny_llama,
                tmp_path / f"lm{i}",
                rank=4,
                seed=10 + i,
                task_type="causal_lm",
                task_name=f"task{i}",
            )
            response = upload_expert(target, folder, f"lm{i}", f"task{i}", progress=False)
            return response.expert.expert_id

        first = [upload(0), upload(1)]
        with grpc.insecure_channel(running.address) as channel:
            trained = admin_pb2_grpc.AdminServiceStub(channel).TrainRouter(
                admin_pb2.TrainRouterRequest(method="arrow", params_json='{"top_k": 1}'),
                metadata=bearer(running.admin_token()),
            )
        assert trained.active and sorted(trained.expert_ids) == sorted(first)
        added = upload(2)
        wait_for(lambda: active_version(running).version > trained.version)
        extended = active_version(running)
        assert extended.trigger == "expert_added" and extended.method == "arrow"
        assert list(extended.expert_ids) == [*trained.expert_ids, added]
        assert extended.params_json == trained.params_json
        served = running.state.routers.active.router
        assert served.expert_ids[-1] == added and served.num_experts == 3
        # a retired expert is not handled incrementally: the debounced refit (an hour) waits
        with grpc.insecure_channel(running.address) as channel:
            admin_pb2_grpc.AdminServiceStub(channel).SetExpertState(
                admin_pb2.SetExpertStateRequest(
                    expert_id=first[0], state=common_pb2.EXPERT_STATE_RETIRED, reason="test"
                ),
                metadata=bearer(running.admin_token()),
            )
        time.sleep(1.5)  # more than a scheduler tick
        assert active_version(running).version == extended.version
