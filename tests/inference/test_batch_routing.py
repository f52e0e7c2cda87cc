"""The running batch's token-routing usage: each request is credited with its own real tokens'
routing weights, padding and other requests' tokens excluded."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from moerge.coordinator.inference.generation.batch_routing import BatchRouting, TokenRouting
from moerge.router_training.base import RoutingDecision

EXPERTS, LENGTH, D = 6, 5, 4


class SeededRouter:
    """Routes each token to random top-2 experts with random weights (seeded per call)."""

    num_experts = EXPERTS

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)
        self.decisions: list[RoutingDecision] = []

    def route_tokens(self, module: str, hidden: torch.Tensor, top_k: int | None) -> RoutingDecision:
        n = hidden.shape[0]
        indices = torch.stack(
            [torch.randperm(EXPERTS, generator=self.generator)[:2] for _ in range(n)]
        )
        weights = torch.rand(n, 2, generator=self.generator).softmax(dim=1)
        decision = RoutingDecision(indices=indices, weights=weights)
        self.decisions.append(decision)
        return decision


@dataclass
class Member:
    rows: int
    slots: list[list[int]]
    weights: list[list[float]]
    token: TokenRouting | None
    usage: torch.Tensor | None = None


def test_token_routing_usage_counts_each_members_real_tokens_only() -> None:
    router = SeededRouter()
    routing = TokenRouting(router, 2, torch.arange(EXPERTS), {"q": "q"})  # type: ignore[arg-type]
    members = [
        Member(1, [[0]], [[1.0]], None),  # row 0: one expert, example-routed
        Member(1, [], [], routing),  # row 1: token-routed
        Member(1, [], [], routing),  # row 2: token-routed
    ]
    engine = SimpleNamespace(bank=None, device=torch.device("cpu"), dtype=torch.float32)
    batch = BatchRouting(engine, members, [0, 1, 2], rows=3)  # type: ignore[arg-type]
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])  # left padding
    batch.mask = mask
    for _ in range(2):  # two modules' worth of routing in one forward
        slots, weights = batch._route("q", torch.randn(3 * LENGTH, D))
        assert slots.shape == weights.shape == (3 * LENGTH, 2)
        assert (slots[:LENGTH, 0] == 0).all()  # the example-routed row keeps its expert
        assert (weights[:LENGTH, 0] == 1).all()
    batch.flush_usage()
    expected = torch.zeros(2, EXPERTS)
    for decision in router.decisions:  # each call routed rows 1 and 2: [2 * LENGTH, 2]
        dense = decision.to_dense(EXPERTS).view(2, LENGTH, EXPERTS)
        expected += (dense * mask[1:].unsqueeze(-1)).sum(dim=1)
    assert members[0].usage is None
    torch.testing.assert_close(members[1].usage, expected[0])
    torch.testing.assert_close(members[2].usage, expected[1])
    assert members[1].usage.sum().item() == 2 * 3  # two modules x three real tokens
