"""Federated router rounds over Flower Messages: accuracy, drop-outs, what leaves a node."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, Message
from safetensors.torch import load

from moerge.router_training import fit_router, load_router
from moerge.router_training.federated import FederatedRouter
from moerge.router_training.federated_rounds import run_federated_rounds
from moerge.router_training.flower_client import make_client_app, partition_loader


def _start(federation, **params) -> FederatedRouter:
    # shrinkage=1: the LDA start ignores the covariance (a nearest-mean router), so rounds help.
    router = fit_router("federated", federation.experts, {"shrinkage": 1.0, **params}).router
    assert isinstance(router, FederatedRouter)
    return router


def test_round_zero_routes_exactly_like_the_lda_router(federation):
    lda = fit_router("lda", federation.experts, {"shrinkage": 0.2}).router
    fed = fit_router("federated", federation.experts, {"shrinkage": 0.2}).router
    torch.testing.assert_close(
        fed.logits(federation.eval_x), lda.logits(federation.eval_x), rtol=1e-4, atol=1e-3
    )
    a, b = lda.route_examples(federation.eval_x, 2), fed.route_examples(federation.eval_x, 2)
    assert torch.equal(a.indices, b.indices)
    assert fed.temperature == pytest.approx(lda.temperature, rel=1e-5)


def test_six_contributors_improve_routing_accuracy_over_the_starting_router(federation):
    start = _start(federation)
    router, metrics, participants = run_federated_rounds(
        start, federation.contributors, rounds=8, evaluation=(federation.eval_x, federation.eval_y)
    )
    before, after = federation.accuracy(start), federation.accuracy(router)
    assert after > before + 0.05, (before, after)
    assert metrics[0]["accuracy"] == before  # round 0 is the starting router
    assert metrics[-1]["accuracy"] == after
    assert [len(p.succeeded) for p in participants] == [6] * 8
    assert all(p.aggregated and not p.failed for p in participants)
    assert federation.accuracy(start) == before  # the starting router is left unchanged


def _offline(federation, partition: int):
    """A ClientApp whose contributor ``partition`` raises in every round."""
    load = partition_loader(federation.contributors)

    def flaky(context: Context):
        if int(context.node_config["partition-id"]) == partition:
            raise ConnectionError("contributor went offline")
        return load(context)

    return make_client_app(flaky)


def test_contributor_that_raises_mid_round_does_not_stop_the_round(federation):
    start = _start(federation)
    router, _, participants = run_federated_rounds(
        start, federation.contributors, rounds=4, client_app=_offline(federation, 2)
    )
    assert len(participants) == 4
    for record in participants:
        assert record.aggregated
        assert record.failed == [3]  # node ids are partition ids + 1
        assert len(record.succeeded) == 5
    # The others' updates are still averaged in; expert 2's own examples are simply missing.
    assert not torch.equal(router.weight, start.weight)
    assert federation.accuracy(router) > federation.accuracy(start)


def test_round_with_fewer_replies_than_min_train_nodes_keeps_the_previous_router(federation):
    load = partition_loader(federation.contributors)

    def mostly_offline(context: Context):
        if int(context.node_config["partition-id"]) != 0:
            raise TimeoutError("offline")
        return load(context)

    start = _start(federation, min_train_nodes=2)
    router, _, participants = run_federated_rounds(
        start, federation.contributors, rounds=2, client_app=make_client_app(mostly_offline)
    )
    assert [p.aggregated for p in participants] == [False, False]
    torch.testing.assert_close(router.weight, start.weight)


def test_messages_hold_only_router_weights_and_counts(federation):
    received: list[Message] = []
    sent: list[Message] = []

    def audit(msg: Message, context: Context, call_next) -> Message:
        received.append(msg)
        reply = call_next(msg, context)
        sent.append(reply)
        return reply

    start = _start(federation)
    app = make_client_app(partition_loader(federation.contributors), mods=[audit])
    run_federated_rounds(start, federation.contributors, rounds=2, client_app=app)
    assert len(sent) == len(received) == 12
    shapes = {k: tuple(v.shape) for k, v in start.arrays().items()}
    assert shapes == {"weight": (32, 6), "bias": (6,)}
    for msg in (*received, *sent):
        assert set(msg.content.array_records) == {"arrays"}
        arrays = msg.content["arrays"].to_torch_state_dict()
        assert {k: tuple(v.shape) for k, v in arrays.items()} == shapes
    for msg in received:
        assert set(content_keys(msg)) == {"arrays", "config"}
        config = msg.content["config"]
        assert list(config["expert-ids"]) == federation.expert_ids
        frozen = load(bytes(config["frozen-arrays"]))  # the router's centre and whitener only
        assert {k: tuple(v.shape) for k, v in frozen.items()} == {
            "center": (32,),
            "whitener": (32, 32),
        }
        others = {k: v for k, v in config.items() if k not in ("expert-ids", "frozen-arrays")}
        assert all(isinstance(v, (int, float)) for v in others.values()), others
    sizes = sorted(len(c.embeddings) for c in federation.contributors)
    for msg in sent:
        assert set(content_keys(msg)) == {"arrays", "metrics"}
        metrics = msg.content["metrics"]
        assert set(metrics) == {"num-examples", "unit-weight", "train-loss", "accuracy-before"}
        assert metrics["num-examples"] in sizes
    assert not msg.content.config_records  # replies carry no config, hence no bytes


def content_keys(msg: Message) -> list[str]:
    return list(msg.content.keys())


def test_fitted_router_saves_loads_and_routes(federation, tmp_path):
    router, _, _ = run_federated_rounds(_start(federation), federation.contributors, rounds=3)
    path = tmp_path / "router.safetensors"
    router.save(path)
    loaded = load_router(path)
    assert isinstance(loaded, FederatedRouter)
    assert loaded.expert_ids == federation.expert_ids
    got, want = loaded.route_examples(federation.eval_x), router.route_examples(federation.eval_x)
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.weights, want.weights)


def test_fit_router_runs_rounds_and_records_participation(federation):
    result = fit_router(
        "federated", federation.experts, {"shrinkage": 1.0, "rounds": 5, "simulated_examples": 200}
    )
    start = _start(federation)
    assert result.metrics["federated_rounds"] == 5.0
    assert result.metrics["federated_rounds_aggregated"] == 5.0
    assert result.metrics["federated_failed_replies"] == 0.0
    assert federation.accuracy(result.router) > federation.accuracy(start)


def test_server_side_dp_clips_each_update_to_the_clipping_norm(federation):
    start = _start(federation, dp="server", clipping_norm=0.05, noise_multiplier=0.0)
    free = _start(federation)
    clipped, _, _ = run_federated_rounds(start, federation.contributors, rounds=1)
    unclipped, _, _ = run_federated_rounds(free, federation.contributors, rounds=1)
    step = (clipped.weight - start.weight).norm() ** 2 + (clipped.bias - start.bias).norm() ** 2
    assert float(step.sqrt()) <= 0.05 + 1e-4
    assert float((unclipped.weight - free.weight).norm()) > 0.05


def test_client_side_dp_clips_updates_on_the_contributor(federation):
    start = _start(federation, dp="client", clipping_norm=0.05, noise_multiplier=0.0)
    clipped, _, participants = run_federated_rounds(start, federation.contributors, rounds=1)
    assert participants[0].aggregated
    step = (clipped.weight - start.weight).norm() ** 2 + (clipped.bias - start.bias).norm() ** 2
    assert float(step.sqrt()) <= 0.05 + 1e-4


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_server_side_optimisers_run_flowers_fedavgm_and_fedadam(federation, optimizer):
    start = _start(federation, server_optimizer=optimizer, server_learning_rate=0.5)
    router, metrics, participants = run_federated_rounds(
        start, federation.contributors, rounds=4, evaluation=(federation.eval_x, federation.eval_y)
    )
    assert all(p.aggregated for p in participants)
    assert not router.weight.equal(start.weight)
    assert metrics[-1]["accuracy"] > metrics[0]["accuracy"]


def test_superlink_backend_is_refused_outside_a_coordinator_with_a_superlink(federation):
    with pytest.raises(ValueError, match="superlink"):
        fit_router("federated", federation.experts, {"rounds": 1, "backend": "superlink"})


def test_dp_rounds_weigh_every_contributor_once(federation):
    """Under DP the average is unweighted, so one contributor moves it by at most
    clipping_norm / sampled, the sensitivity the noise is calibrated to."""
    sizes = {len(c.embeddings) for c in federation.contributors}
    assert len(sizes) > 1  # example counts differ: weighting by them would differ
    start = _start(federation, dp="server", clipping_norm=1e6, noise_multiplier=0.0)
    outcome = run_federated_rounds(start, federation.contributors, rounds=1, keep_replies=True)
    updates = [m.content["arrays"].to_torch_state_dict() for m in outcome.replies]
    assert len(updates) == len(federation.contributors)
    mean = torch.stack([u["weight"] for u in updates]).mean(0)
    torch.testing.assert_close(outcome.router.weight, mean, rtol=1e-5, atol=1e-6)


def test_dp_round_with_a_failed_contributor_is_not_released(federation):
    start = _start(federation, dp="server", clipping_norm=0.05, noise_multiplier=1.0)
    outcome = run_federated_rounds(
        start, federation.contributors, rounds=2, client_app=_offline(federation, 2)
    )
    assert not any(r.aggregated for r in outcome.participants)
    torch.testing.assert_close(outcome.router.weight, start.weight)
    assert outcome.summary()["dp_released_rounds"] == 0.0
    assert outcome.summary()["dp_epsilon"] == 0.0


def test_dp_rounds_report_the_epsilon_they_spent(federation):
    from moerge.router_training.federated_privacy import rounds_privacy

    start = _start(federation, dp="server", clipping_norm=0.05, noise_multiplier=1.0, dp_delta=1e-5)
    outcome = run_federated_rounds(start, federation.contributors, rounds=3)
    summary = outcome.summary()
    assert summary["dp_released_rounds"] == 3.0 and summary["dp_delta"] == 1e-5
    assert summary["dp_epsilon"] == pytest.approx(rounds_privacy(1.0, 3, 6, 6, 1e-5).epsilon)
    # The Gaussian mechanism's zCDP bound, rho + 2 sqrt(rho log(1/delta)), rho = T / (2 sigma^2),
    # holds for the RDP accountant's epsilon, and the accountant is not far below it.
    rho = 3 / 2
    bound = rho + 2 * (rho * torch.tensor(1e5).log().item()) ** 0.5
    assert 0.7 * bound < summary["dp_epsilon"] <= bound
    # More rounds spend more; more noise spends less.
    assert rounds_privacy(1.0, 6, 6, 6, 1e-5).epsilon > summary["dp_epsilon"]
    assert rounds_privacy(2.0, 3, 6, 6, 1e-5).epsilon < summary["dp_epsilon"]


def test_dp_without_noise_reports_no_epsilon(federation):
    start = _start(federation, dp="server", clipping_norm=0.05, noise_multiplier=0.0)
    assert "dp_epsilon" not in run_federated_rounds(start, federation.contributors, 1).summary()


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_dp_refuses_server_optimisers_that_would_keep_unnoised_state(federation, optimizer):
    with pytest.raises(ValueError, match="dp runs plain FedAvg"):
        _start(federation, dp="server", noise_multiplier=1.0, server_optimizer=optimizer)
