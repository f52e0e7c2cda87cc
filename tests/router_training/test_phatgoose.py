"""PHATGOOSE equals a dense reference written from the paper's equations."""

from __future__ import annotations

import math

import pytest
import torch

from moerge.router_training import (
    ExpertRecord,
    ExpertStatistics,
    PhatgooseRouter,
    PhatgooseRouterConfig,
)
from tests.router_training.helpers import orthonormal

D = 24
MODULES = ("encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense")


def gate_experts(gates: list[dict[str, torch.Tensor]]) -> list[ExpertRecord]:
    empty = torch.zeros(D)
    return [
        ExpertRecord(
            expert_id=f"e{i}",
            statistics=ExpertStatistics(
                example_count=10,
                mean=empty,
                cov_diag=empty + 1,
                cov_factor=torch.zeros(D, 0),
                gates=g,
            ),
        )
        for i, g in enumerate(gates)
    ]


def paper_weights(
    hidden: torch.Tensor, gates: torch.Tensor, k: int, temperature: float, eps: float = 1e-5
) -> torch.Tensor:
    """Muqeeth et al. (2024), token by token and expert by expert: dense [N, E] weights."""
    num_tokens, num_experts = hidden.shape[0], gates.shape[0]
    weights = torch.zeros(num_tokens, num_experts, dtype=torch.float64)
    for t in range(num_tokens):
        h = hidden[t].double()
        z_h = (h - h.mean()) / math.sqrt(float(((h - h.mean()) ** 2).mean()) + eps)
        scores = []
        for e in range(num_experts):
            g = gates[e].double()
            z_g = (g - g.mean()) / math.sqrt(float(((g - g.mean()) ** 2).mean()) + eps)
            scores.append(float(z_h @ z_g) / math.sqrt(len(h)))
        top = sorted(range(num_experts), key=lambda e: -scores[e])[:k]
        norm = sum(math.exp(scores[e] / temperature) for e in top)
        for e in top:
            weights[t, e] = math.exp(scores[e] / temperature) / norm
    return weights.float()


@pytest.mark.parametrize(("top_k", "temperature"), [(1, 1.0), (2, 1.0), (3, 0.5)])
def test_token_weights_equal_the_dense_paper_reference(top_k: int, temperature: float) -> None:
    gen = torch.Generator().manual_seed(0)
    gates = [{m: torch.randn(D, generator=gen) * 3 + 1 for m in MODULES} for _ in range(5)]
    router = PhatgooseRouter.fit(
        gate_experts(gates), PhatgooseRouterConfig(top_k=top_k, temperature=temperature)
    )
    for module in MODULES:
        hidden = torch.randn(17, D, generator=gen) * 2 - 0.5
        stacked = torch.stack([g[module] for g in gates])
        expected = paper_weights(hidden, stacked, top_k, temperature)
        decision = router.route_tokens(module, hidden)
        torch.testing.assert_close(decision.to_dense(5), expected, atol=1e-5, rtol=0)


def test_tokens_aligned_with_a_gate_route_to_its_expert() -> None:
    directions = orthonormal(4, D, seed=5)
    gen = torch.Generator().manual_seed(5)
    gates = [{MODULES[0]: directions[e] + 0.05 * torch.randn(D, generator=gen)} for e in range(4)]
    router = PhatgooseRouter.fit(gate_experts(gates), PhatgooseRouterConfig(top_k=2))
    tokens = 4.0 * directions + 0.2 * torch.randn(4, D, generator=gen)
    decision = router.route_tokens(MODULES[0], tokens)
    assert decision.indices[:, 0].tolist() == [0, 1, 2, 3]


def test_gate_scale_and_offset_do_not_change_routing() -> None:
    """Standardisation makes a gate's mean and scale irrelevant, as in the paper."""
    gen = torch.Generator().manual_seed(6)
    gates = [{MODULES[0]: torch.randn(D, generator=gen)} for _ in range(3)]
    shifted = [{m: 10 * g + 3 for m, g in gate.items()} for gate in gates]
    hidden = torch.randn(9, D, generator=gen)
    a = PhatgooseRouter.fit(gate_experts(gates), PhatgooseRouterConfig(top_k=2))
    b = PhatgooseRouter.fit(gate_experts(shifted), PhatgooseRouterConfig(top_k=2))
    da, db = a.route_tokens(MODULES[0], hidden), b.route_tokens(MODULES[0], hidden)
    assert torch.equal(da.indices, db.indices)
    torch.testing.assert_close(da.weights, db.weights)


def test_experts_without_gates_are_rejected_by_name() -> None:
    experts = gate_experts([{MODULES[0]: torch.randn(D)}, {}])
    with pytest.raises(ValueError, match="e1"):
        PhatgooseRouter.fit(experts, PhatgooseRouterConfig(top_k=1))
