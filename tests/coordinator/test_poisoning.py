"""Poisoned experts are caught by the consistency checks, quarantined with a reason, and unrouted.

Two planted poisoners: one whose uploaded mean is another contributor's expert's mean (to
capture its traffic under a centroid router), one whose PHATGOOSE gates are scaled up ten times.
The checks are also run alone on synthetic honest experts, to see that they flag none.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moerge.cli import app as moerge_cli
from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import upload_expert
from moerge.expert_format import GATE_PREFIX, MEAN_KEY, STATISTICS_TENSORS
from moerge.router_training.base import ExpertRecord, ExpertStatistics
from moerge.router_training.consistency import ConsistencyConfig, copy_threshold, screen
from moerge.router_training.synthetic import minilm_modules, synthetic_gaussian_experts
from moerge.storage.registry import ADMISSION_ACTOR
from moerge.v1 import admin_pb2, admin_pb2_grpc, common_pb2, inference_pb2, inference_pb2_grpc
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator, bearer
from tests.coordinator.test_server import enroll
from tests.experts import make_expert_dir

HONEST = 5
TEXTS = [f"text number {i} good bad film bank" for i in range(16)]


def _scale_gates(folder: Path, factor: float) -> Path:
    tensors = load_file(str(folder / STATISTICS_TENSORS))
    tensors = {k: v * factor if k.startswith(GATE_PREFIX) else v for k, v in tensors.items()}
    save_file(tensors, str(folder / STATISTICS_TENSORS))
    return folder


def _mean(folder: Path) -> torch.Tensor:
    return load_file(str(folder / STATISTICS_TENSORS))[MEAN_KEY]


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("honest")
    return [make_expert_dir(tiny_bert, root / f"h{i}", seed=i) for i in range(HONEST)]


def _upload(target: Target, folder: Path, name: str) -> common_pb2.Expert:
    return upload_expert(target, folder, name, name, progress=False).expert


def _states(running: BackgroundCoordinator) -> dict[str, tuple[str, str]]:
    experts = running.state.registry.list_experts(page_size=100).items
    return {e.name: (e.state, e.state_reason) for e in experts}


def _routed(running: BackgroundCoordinator) -> set[str]:
    with grpc.insecure_channel(running.address) as ch:
        response = inference_pb2_grpc.InferenceServiceStub(ch).Predict(
            inference_pb2.PredictRequest(inputs=TEXTS, top_k=2),
            metadata=bearer(running.admin_token()),
        )
    return {e.expert_id for p in response.predictions for e in p.experts}


def test_planted_poisoners_are_quarantined_at_upload_with_a_reason_and_get_no_traffic(
    tmp_path: Path, tiny_bert: Path, honest: list[Path]
) -> None:
    copycat = make_expert_dir(tiny_bert, tmp_path / "copycat", seed=50, mean=_mean(honest[0]))
    loud = _scale_gates(make_expert_dir(tiny_bert, tmp_path / "loud", seed=51), 10.0)
    with BackgroundCoordinator(coordinator_config(tmp_path / "data", tiny_bert)) as running:
        admin = running.admin_token()
        targets = [
            Target(running.address, enroll(running.address, admin, name)[1])
            for name in ("alice", "bob", "mallory")
        ]
        honest_ids = [_upload(targets[i % 2], f, f"h{i}") for i, f in enumerate(honest)]
        copied = _upload(targets[2], copycat, "copycat")
        shouting = _upload(targets[2], loud, "loud")

        states = _states(running)
        assert copied.state == shouting.state == common_pb2.EXPERT_STATE_QUARANTINED
        assert states["copycat"][0] == "quarantined"
        assert f"sampling noise of expert {honest_ids[0].expert_id}" in states["copycat"][1]
        assert states["loud"][0] == "quarantined"
        assert "PHATGOOSE gate norms are 1" in states["loud"][1]  # about 10x
        assert all(states[f"h{i}"] == ("active", "") for i in range(HONEST))

        audit = running.state.registry.list_audit(page_size=100, action="expert.set_state").items
        assert {(a.target_id, a.actor, a.details["reason"]) for a in audit} == {
            (copied.expert_id, ADMISSION_ACTOR, states["copycat"][1]),
            (shouting.expert_id, ADMISSION_ACTOR, states["loud"][1]),
        }
        cli = ["-c", running.address, "--token", admin, "--json"]
        shown = CliRunner().invoke(moerge_cli, ["admin", "experts", "show", copied.expert_id, *cli])
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.output)["state_reason"] == states["copycat"][1]
        listed = CliRunner().invoke(
            moerge_cli, ["admin", "experts", "list", "--state", "quarantined", *cli]
        )
        assert {e["name"]: e["state_reason"] for e in json.loads(listed.output)["experts"]} == {
            "copycat": states["copycat"][1],
            "loud": states["loud"][1],
        }
        table = CliRunner().invoke(
            moerge_cli,
            ["admin", "experts", "list", "--state", "quarantined", *cli[:-1]],
            env={"COLUMNS": "400"},
        )
        assert table.exit_code == 0, table.output
        assert "reason" in table.output and states["copycat"][1][:20] in table.output

        assert _routed(running).isdisjoint({copied.expert_id, shouting.expert_id})
        with grpc.insecure_channel(running.address) as ch:
            version = admin_pb2_grpc.AdminServiceStub(ch).TrainRouter(
                admin_pb2.TrainRouterRequest(method="centroid"), metadata=bearer(admin)
            )
        assert set(version.expert_ids) == {e.expert_id for e in honest_ids}
        assert _routed(running).isdisjoint({copied.expert_id, shouting.expert_id})


def test_a_poisoner_admitted_before_it_had_peers_is_quarantined_at_the_next_router_fit(
    tmp_path: Path, tiny_bert: Path, honest: list[Path]
) -> None:
    loud = _scale_gates(make_expert_dir(tiny_bert, tmp_path / "loud", seed=51), 10.0)
    with BackgroundCoordinator(coordinator_config(tmp_path / "data", tiny_bert)) as running:
        admin = running.admin_token()
        mallory = Target(running.address, enroll(running.address, admin, "mallory")[1])
        alice = Target(running.address, enroll(running.address, admin, "alice")[1])
        early = _upload(mallory, loud, "loud")  # no peers yet: gate norms cannot be judged
        assert early.state == common_pb2.EXPERT_STATE_ACTIVE
        for i, folder in enumerate(honest):
            _upload(alice, folder, f"h{i}")
        with grpc.insecure_channel(running.address) as ch:
            stub = admin_pb2_grpc.AdminServiceStub(ch)
            version = stub.TrainRouter(
                admin_pb2.TrainRouterRequest(method="phatgoose"), metadata=bearer(admin)
            )
            assert early.expert_id not in version.expert_ids
            assert len(version.expert_ids) == HONEST
            state, reason = _states(running)["loud"]
            assert state == "quarantined" and "gate norms" in reason
            assert early.expert_id not in _routed(running)

            # An admin who reviewed it and set it active again is not overruled.
            stub.SetExpertState(
                admin_pb2.SetExpertStateRequest(
                    expert_id=early.expert_id,
                    state=common_pb2.EXPERT_STATE_ACTIVE,
                    reason="reviewed: gates trained longer",
                ),
                metadata=bearer(admin),
            )
            again = stub.TrainRouter(
                admin_pb2.TrainRouterRequest(method="centroid"), metadata=bearer(admin)
            )
        assert early.expert_id in again.expert_ids


def test_consistency_checks_can_be_turned_off(
    tmp_path: Path, tiny_bert: Path, honest: list[Path]
) -> None:
    copycat = make_expert_dir(tiny_bert, tmp_path / "copycat", seed=50, mean=_mean(honest[0]))
    config = coordinator_config(tmp_path / "data", tiny_bert, consistency_checks=False)
    with BackgroundCoordinator(config) as running:
        admin = running.admin_token()
        alice = Target(running.address, enroll(running.address, admin, "alice")[1])
        mallory = Target(running.address, enroll(running.address, admin, "mallory")[1])
        _upload(alice, honest[0], "h0")
        assert _upload(mallory, copycat, "copycat").state == common_pb2.EXPERT_STATE_ACTIVE


# -- the checks alone, on synthetic experts --------------------------------------------------


def _synthetic(count: int, seed: int) -> list[ExpertRecord]:
    gates = {module: d_in for module, (d_in, _) in minilm_modules(layers=2).items()}
    return synthetic_gaussian_experts(count, seed=seed, gate_modules=gates)


def test_honest_synthetic_experts_are_not_flagged() -> None:
    for seed in range(3):
        experts = _synthetic(150, seed)
        owners = {e.expert_id: e.expert_id for e in experts}
        assert screen(experts, owners, ConsistencyConfig()) == [], f"seed {seed}"


def test_honest_experts_of_one_distribution_are_not_mistaken_for_copies() -> None:
    """Same data distribution, independent samples: the closest honest experts can be."""
    gen = torch.Generator().manual_seed(0)
    hidden, rank = 384, 8
    flagged = 0
    for _ in range(500):
        factor = torch.randn(hidden, rank, generator=gen) * math.sqrt(0.1 / (hidden * rank))
        diag = torch.rand(hidden, generator=gen) * 0.2 / hidden
        pair = []
        for n in torch.randint(20, 2000, (2,), generator=gen).tolist():
            noise = factor @ torch.randn(rank, generator=gen)
            noise += diag.sqrt() * torch.randn(hidden, generator=gen)
            pair.append(ExpertStatistics(n, noise / math.sqrt(n), cov_diag=diag, cov_factor=factor))
        distance = float((pair[0].mean - pair[1].mean).square().sum())
        flagged += distance < copy_threshold(pair[0], pair[1], 1e-3)
    assert flagged == 0


def test_planted_synthetic_poisoners_are_flagged_and_honest_ones_are_not() -> None:
    experts = _synthetic(40, seed=7)
    victim, template = experts[3].statistics, experts[4].statistics
    assert victim is not None and template is not None
    copy = ExpertStatistics(
        50, victim.mean.clone(), template.cov_diag, template.cov_factor, template.gates
    )
    loud = ExpertStatistics(
        template.example_count,
        template.mean + 0.05,
        template.cov_diag,
        template.cov_factor,
        {m: 10 * g for m, g in template.gates.items()},
    )
    planted = [ExpertRecord("copy", statistics=copy), ExpertRecord("loud", statistics=loud)]
    records = experts + planted
    owners = {e.expert_id: e.expert_id for e in records}
    findings = {f.expert_id: f.check for f in screen(records, owners, ConsistencyConfig())}
    assert findings == {"copy": "mean_copy", "loud": "gate_norm"}
    owners["copy"] = owners[experts[3].expert_id]  # a contributor's own new version: fine
    assert "copy" not in {f.expert_id for f in screen(records, owners, ConsistencyConfig())}
