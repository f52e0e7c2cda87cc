"""Fits leave out experts that lack what the method learns from, and name the ones it can't pick."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moerge.router_training import LoraModuleWeights, fit_router
from moerge.router_training.fitting import routable_experts
from tests.router_training.helpers import planted_experts


def _adapter_only(record):  # no statistics of any data, as uploaded with --no-statistics
    return dataclasses.replace(record, statistics=None)


def _zero_update(record):  # B = 0 everywhere: the LoRA left at its initialisation
    lora = {
        m: LoraModuleWeights(A=w.A, B=torch.zeros_like(w.B), scaling=w.scaling)
        for m, w in record.load_lora().items()
    }
    gates = {m: torch.zeros_like(g) for m, g in record.statistics.gates.items()}
    stats = dataclasses.replace(record.statistics, gates=gates)
    return dataclasses.replace(record, statistics=stats, load_lora=lambda: lora)


@pytest.mark.parametrize(
    ("method", "routed"),
    [("lda", 3), ("centroid", 3), ("phatgoose", 3), ("arrow", 4), ("uniform", 4)],
)
def test_a_mixed_library_is_routed_among_the_experts_each_method_can_learn_from(
    method: str, routed: int
) -> None:
    experts = planted_experts(4)
    experts[2] = _adapter_only(experts[2])
    result = fit_router(method, experts)
    assert result.router.num_experts == routed
    assert ("expert-2" in result.skipped) == (routed == 3)
    if routed == 3:
        assert "adapter-only" in result.skipped["expert-2"] or "gates" in result.skipped["expert-2"]


def test_a_method_with_nothing_to_learn_from_says_what_it_needs() -> None:
    with pytest.raises(ValueError, match="learns from statistics"):
        routable_experts("qda", [_adapter_only(e) for e in planted_experts(3)])


@pytest.mark.parametrize("method", ["arrow", "phatgoose"])
def test_experts_with_a_zero_update_are_reported_and_score_zero(method: str) -> None:
    experts = planted_experts(4)
    experts[1] = _zero_update(experts[1])
    result = fit_router(method, experts)
    router = result.router
    assert router.zero_vector_experts() == ["expert-1"]
    assert result.metrics["zero_vector_experts"] == 1.0
    module = router.modules[0]
    tokens = torch.randn(64, router.vectors[module].shape[1])
    assert torch.equal(router.scores(module, tokens)[:, 1], torch.zeros(64))
    first = router.route_tokens(module, tokens, top_k=1).indices[:, 0]
    assert (1 in first.tolist()) == (method == "phatgoose")  # Arrow's |score| never loses to 0
