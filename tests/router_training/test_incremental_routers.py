"""Adding experts to a fitted router without a refit: equal to the refit, at the new ones' cost."""

from __future__ import annotations

import pytest
import torch

from moerge.router_training import ArrowRouter, ArrowRouterConfig, ExpertRecord, LoraModuleWeights
from moerge.router_training.registry import available_methods, get_router_class

MODULES = {"layer.0.q": (16, 12), "layer.0.v": (16, 8), "layer.1.q": (16, 12)}  # d_in, d_out


def expert(name: str, seed: int, modules: dict[str, tuple[int, int]] = MODULES) -> ExpertRecord:
    generator = torch.Generator().manual_seed(seed)
    lora = {
        m: LoraModuleWeights(torch.randn(4, d_in, generator=generator),
                             torch.randn(d_out, 4, generator=generator), 2.0)
        for m, (d_in, d_out) in modules.items()
    }
    return ExpertRecord(expert_id=name, load_lora=lambda: lora)


@pytest.mark.parametrize("solver", ["power_iteration", "svd"])
def test_arrow_extended_equals_a_refit_over_all_experts(solver: str) -> None:
    config = ArrowRouterConfig(top_k=2, prototype_solver=solver)
    old = [expert(f"e{i}", i) for i in range(3)]
    new = [expert("n0", 10), expert("n1", 11, {"layer.1.q": (16, 12), "layer.2.o": (16, 4)})]
    refit = ArrowRouter.fit(old + new, config)
    before = ArrowRouter.fit(old, config)
    extended = before.extended(new)
    assert extended.expert_ids == refit.expert_ids
    assert extended.modules == refit.modules  # a module only a new expert adapts is added
    for module in refit.modules:
        torch.testing.assert_close(extended.vectors[module], refit.vectors[module])
        assert torch.equal(extended.members[module], refit.members[module])
    hidden = torch.randn(5, 16)
    for module in refit.modules:
        k = min(2, len(refit.members[module]))
        a, b = extended.route_tokens(module, hidden, k), refit.route_tokens(module, hidden, k)
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.weights, b.weights)
    assert before.expert_ids == ["e0", "e1", "e2"]  # the old router is left as it was


def test_extending_with_a_known_expert_is_refused() -> None:
    router = ArrowRouter.fit([expert("e0", 0), expert("e1", 1)], ArrowRouterConfig(top_k=1))
    with pytest.raises(ValueError, match="duplicate"):
        router.extended([expert("e1", 1)])


def test_only_methods_that_declare_it_extend_and_the_others_say_so() -> None:
    incremental = {m for m in available_methods() if get_router_class(m).incremental}
    assert "arrow" in incremental
    assert "centroid" not in incremental  # its temperature is calibrated over all experts
