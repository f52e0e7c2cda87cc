"""Shared synthetic federation: experts whose shared covariance a nearest-mean start ignores."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from moerge.router_training.base import ExpertRecord
from moerge.router_training.federated import simulated_contributors
from moerge.router_training.federated_base import ContributorData
from moerge.router_training.gaussian import GaussianBank
from moerge.router_training.synthetic import synthetic_gaussian_experts


@dataclass
class Federation:
    experts: list[ExpertRecord]
    contributors: list[ContributorData]
    eval_x: torch.Tensor
    eval_y: torch.Tensor

    @property
    def expert_ids(self) -> list[str]:
        return [e.expert_id for e in self.experts]

    def accuracy(self, router) -> float:
        return float((router.logits(self.eval_x).argmax(-1) == self.eval_y).float().mean())


@pytest.fixture(scope="module")
def federation() -> Federation:
    """Six contributors, one expert each, hidden size 32; separable but covariance-skewed."""
    experts = synthetic_gaussian_experts(
        6,
        hidden_size=32,
        rank=4,
        seed=0,
        shared_covariance=1.0,
        within_variance=0.5,
        mean_spread=0.3,
    )
    bank = GaussianBank.from_experts(experts)
    contributors = simulated_contributors(bank, [e.expert_id for e in experts], 500, seed=3)
    x, y = bank.draw_labelled(3000, bank.prior_probs("counts"), torch.Generator().manual_seed(7))
    return Federation(experts, contributors, x, y)
