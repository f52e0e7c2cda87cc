"""Router rounds on Flower's deployment runtime: a real SuperLink and SuperNode processes.

Marked ``soak``: every round starts a ``flwr-clientapp`` process per node (Flower's subprocess
isolation), which imports torch; on 2 shared cores one run takes ~3 min. It runs only under
``-m soak``: ``OMP_NUM_THREADS=1 .venv/bin/pytest -q -m soak tests/federated``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moerge.contributor_client.supernode import save_local_embeddings, supernode_command
from moerge.router_training import fit_router
from moerge.router_training.superlink import (
    SuperLinkFederation,
    fit_on_superlink,
    flower_binary,
)

pytestmark = pytest.mark.soak


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def superlink(tmp_path, request):
    if "soak" not in (request.config.option.markexpr or ""):  # as tests/fuzz does
        pytest.skip("soak: run with -m soak (real Flower processes, ~3 min on 2 cores)")
    try:
        flower_binary("flower-superlink")
        flower_binary("flower-supernode")
    except FileNotFoundError as exc:  # flwr's binaries not installed; a failed start fails
        pytest.skip(f"cannot start a Flower SuperLink here: {exc}")
    federation = SuperLinkFederation.start(f"127.0.0.1:{_free_port()}", tmp_path / "fl")
    yield federation
    federation.close()


def _start_supernodes(superlink, federation, tmp_path: Path, count: int):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    nodes = []
    for i, data in enumerate(federation.contributors[:count]):
        path = tmp_path / f"emb-{i}.safetensors"
        save_local_embeddings(path, data.embeddings)
        argv = supernode_command(
            superlink.address,
            path,
            data.expert_ids[0],
            root_certificates=None,
            private_key=None,
            insecure=True,
            contributor_id=f"contributor-{i}",
            node_port=_free_port(),
        )
        log = open(tmp_path / f"supernode-{i}.log", "wb")  # noqa: SIM115 (closed with the node)
        nodes.append((subprocess.Popen(argv, stdout=log, stderr=log, env=env), log))
    return nodes


def test_two_rounds_over_real_supernodes_record_each_contributor(superlink, federation, tmp_path):
    nodes = _start_supernodes(superlink, federation, tmp_path, 3)
    try:
        start = fit_router("federated", federation.experts, {"shrinkage": 1.0}).router
        outcome = superlink.run_rounds(start, 2, min_nodes=3, node_wait_seconds=90)
        # The coordinator's path (RouterService with config `superlink`): fit metrics.
        fit = fit_on_superlink(
            superlink, federation.experts, {"shrinkage": 1.0, "rounds": 1, "min_nodes": 3}
        )
    finally:
        for process, log in nodes:
            process.terminate()
            process.wait(10)
            log.close()
    assert [len(r.succeeded) for r in outcome.participants] == [3, 3]
    assert all(r.aggregated and not r.failed for r in outcome.participants)
    assert outcome.contributor_rounds() == {f"contributor-{i}": 2 for i in range(3)}
    # The three contributors hold experts 0-2 only, so the average moved the router.
    assert not outcome.router.weight.equal(start.weight)
    assert 0 < outcome.round_metrics[2]["accuracy-before"] <= 1
    summary = outcome.summary()
    assert summary["federated_contributor_contributor-1_rounds"] == 2.0
    assert summary["federated_round_2_succeeded"] == 3.0
    assert fit.router.method == "federated" and fit.router.config.backend == "superlink"
    assert fit.metrics["federated_rounds"] == 1.0
    assert {k for k in fit.metrics if k.startswith("federated_contributor_")} == {
        f"federated_contributor_contributor-{i}_rounds" for i in range(3)
    }


def test_admin_router_train_runs_rounds_over_the_coordinators_superlink(tmp_path, request):
    """``moerge admin router train --method federated --rounds 1`` against a coordinator with
    ``superlink = "start"`` and two contributors' SuperNodes: a new router version whose fit
    metrics name both contributors."""
    if "soak" not in (request.config.option.markexpr or ""):
        pytest.skip("soak: run with -m soak")
    import grpc
    import torch

    from moerge.contributor_client.connection import Target
    from moerge.contributor_client.upload import upload_expert
    from moerge.router_training.gaussian import GaussianBank
    from moerge.v1 import admin_pb2, admin_pb2_grpc
    from tests.coordinator.conftest import coordinator_config
    from tests.coordinator.harness import BackgroundCoordinator, bearer
    from tests.coordinator.test_server import enroll
    from tests.experts import make_expert_dir
    from tests.tiny_models import make_tiny_bert

    bert = make_tiny_bert(tmp_path / "bert")
    listen = f"127.0.0.1:{_free_port()}"
    config = coordinator_config(tmp_path / "d", bert, superlink="start", superlink_listen=listen)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with BackgroundCoordinator(config) as running:
        contributors = []
        for i in range(2):
            contributor_id, credential = enroll(running.address, running.admin_token(), f"c{i}")
            folder = make_expert_dir(bert, tmp_path / f"e{i}", seed=i, task_name=f"task{i}")
            target = Target(address=running.address, token=credential)
            upload_expert(target, folder, f"expert{i}", f"task{i}", progress=False)
            contributors.append(contributor_id)
        experts = running.state.registry.active_experts()
        records = [running.state.routers.experts.record(e) for e in experts]
        bank = GaussianBank.from_experts(records)
        nodes = []
        for i, (expert, record) in enumerate(zip(experts, records, strict=True)):
            labels = torch.full((100,), i, dtype=torch.long)
            path = tmp_path / f"emb-{i}.safetensors"
            save_local_embeddings(path, bank.sample(labels, torch.Generator().manual_seed(i)))
            owner = expert.contributor_id
            argv = supernode_command(
                listen,
                path,
                record.expert_id,
                root_certificates=None,
                private_key=None,
                insecure=True,
                contributor_id=owner,
                node_port=_free_port(),
            )
            log = open(tmp_path / f"node-{i}.log", "wb")  # noqa: SIM115
            nodes.append((subprocess.Popen(argv, stdout=log, stderr=log, env=env), log))
        try:
            with grpc.insecure_channel(running.address) as channel:
                admin = admin_pb2_grpc.AdminServiceStub(channel)
                version = admin.TrainRouter(
                    admin_pb2.TrainRouterRequest(
                        method="federated", rounds=1, params_json='{"min_nodes": 2}'
                    ),
                    metadata=bearer(running.admin_token()),
                    timeout=600,
                )
        finally:
            for process, log in nodes:
                process.terminate()
                process.wait(10)
                log.close()
    assert version.method == "federated" and version.status == "ready"
    metrics = dict(version.metrics)
    assert metrics["federated_rounds_aggregated"] == 1.0
    assert metrics["federated_round_1_succeeded"] == 2.0
    for owner in set(contributors):
        assert metrics[f"federated_contributor_{owner}_rounds"] == 1.0
