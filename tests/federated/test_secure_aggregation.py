"""SecAgg+ rounds (Flower's legacy SecAggPlusWorkflow + secaggplus_mod) for the linear router."""

from __future__ import annotations

import torch

from moerge.router_training import fit_router
from moerge.router_training.federated_rounds import run_federated_rounds


def test_secure_aggregate_equals_plain_fedavg_within_the_quantisation_step(federation):
    params = {"shrinkage": 1.0}
    plain_start = fit_router("federated", federation.experts, params).router
    secure_start = fit_router(
        "federated", federation.experts, {**params, "secure_aggregation": True}
    ).router
    plain, _, _ = run_federated_rounds(plain_start, federation.contributors, rounds=2)
    secure, metrics, participants = run_federated_rounds(
        secure_start, federation.contributors, rounds=2
    )
    moved = (plain.weight - plain_start.weight).abs().max()
    # max_weight 1e4 / ~500 examples x (2 / 2**22) per value and contributor, two rounds
    torch.testing.assert_close(secure.weight, plain.weight, rtol=0, atol=1e-4)
    torch.testing.assert_close(secure.bias, plain.bias, rtol=0, atol=1e-4)
    assert moved > 100 * 1e-4  # the rounds moved the weights far more than the tolerance
    assert [len(p.succeeded) for p in participants] == [6, 6]
    assert all(p.aggregated for p in participants)
    assert 0 < metrics[2]["accuracy-before"] <= 1
