"""Adding experts to a fitted router without a refit: equal to the refit, at the new ones' cost."""

from __future__ import annotations

import pytest
import torch

from moerge.router_training import ArrowRouter, ArrowRouterConfig, ExpertRecord, LoraModuleWeights
from moerge.router_training.base import load_router
from moerge.router_training.methods import available_methods, get_router_class

MODULES = {"layer.0.q": (16, 12), "layer.0.v": (16, 8), "layer.1.q": (16, 12)}  # d_in, d_out


def expert(name: str, seed: int, modules: dict[str, tuple[int, int]] = MODULES) -> ExpertRecord:
    generator = torch.Generator().manual_seed(seed)
    lora = {
        m: LoraModuleWeights(
            torch.randn(4, d_in, generator=generator),
            torch.randn(d_out, 4, generator=generator),
            2.0,
        )
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


def route_all(router: ArrowRouter, hidden: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
    """Scores and decisions of ``hidden`` in every module the router routes."""
    out = {}
    for module in router.modules:
        k = min(2, len(router.members[module]))
        decision = router.route_tokens(module, hidden, k)
        out[module] = (router.scores(module, hidden), decision.indices, decision.weights)
    return out


def assert_same_routing(a: dict[str, tuple[torch.Tensor, ...]], b: dict) -> None:
    assert a.keys() == b.keys()
    for module in a:
        for x, y in zip(a[module], b[module], strict=True):
            assert x.dtype == y.dtype and torch.equal(x, y), module


def test_extended_routers_route_bf16_tokens_exactly_as_a_fresh_fit() -> None:
    """Each router is placed (bf16 tokens) before it is extended, as on a serving GPU, so each
    extension appends to placed tables: the scores and decisions equal a fresh fit's, bit for
    bit, in the tokens' dtype."""
    config = ArrowRouterConfig(top_k=2)
    experts = [expert(f"e{i}", i) for i in range(3)]
    hidden = torch.randn(9, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    router = ArrowRouter.fit(experts, config)
    route_all(router, hidden)
    for i, new in enumerate(
        [
            expert("n0", 10),
            expert("n1", 11),
            expert("n2", 12),
            expert("n3", 13, {"layer.1.q": (16, 12), "layer.2.o": (16, 4)}),
        ]
    ):
        router = router.extended([new])
        experts.append(new)
        assert_same_routing(
            route_all(router, hidden), route_all(ArrowRouter.fit(experts, config), hidden)
        )
        assert router.scores("layer.0.q", hidden).dtype == torch.bfloat16, i


def test_an_extension_appends_to_the_placed_tables_of_the_router_it_extends() -> None:
    """Once the placed bf16 buffer has room (after the first extension grows it), extending
    writes only the new rows: the new router's placed table shares the old one's storage, and
    the old router still sees its own rows, unchanged."""
    router = ArrowRouter.fit([expert(f"e{i}", i) for i in range(3)], ArrowRouterConfig(top_k=2))
    hidden = torch.randn(4, 16).bfloat16()
    route_all(router, hidden)
    first = router.extended([expert("n0", 10)])  # the exact-size buffer grows here
    route_all(first, hidden)
    placed = {m: first.placed_tables(m, "cpu", torch.bfloat16)[0].clone() for m in first.modules}
    second = first.extended([expert("n1", 11)])
    route_all(second, hidden)
    for module in first.modules:
        old_vectors, _ = first.placed_tables(module, "cpu", torch.bfloat16)
        new_vectors, members = second.placed_tables(module, "cpu", torch.bfloat16)
        assert new_vectors.data_ptr() == old_vectors.data_ptr()  # the old rows, not a copy
        assert torch.equal(new_vectors[: len(old_vectors)], placed[module])
        assert torch.equal(old_vectors, placed[module])  # the old router's view is intact
        assert len(new_vectors) == len(members) == len(old_vectors) + 1
        assert torch.equal(new_vectors, second.vectors[module].bfloat16())


def test_a_router_extended_twice_gives_two_independent_routers() -> None:
    """The coordinator extends the active router again when writing the first extension
    failed: the second must not write over the first's new rows (nor the first over the
    second's), in the master tables or the placed ones."""
    config = ArrowRouterConfig(top_k=2)
    experts = [expert(f"e{i}", i) for i in range(3)] + [expert("x", 9)]
    hidden = torch.randn(6, 16).bfloat16()
    fitted = ArrowRouter.fit(experts[:3], config)
    route_all(fitted, hidden)
    base = fitted.extended(experts[3:])  # its master and placed buffers have spare rows
    route_all(base, hidden)
    a, b = base.extended([expert("a", 20)]), base.extended([expert("b", 21)])
    routed_a, routed_b = route_all(a, hidden), route_all(b, hidden)
    assert_same_routing(
        routed_a, route_all(ArrowRouter.fit([*experts, expert("a", 20)], config), hidden)
    )
    assert_same_routing(
        routed_b, route_all(ArrowRouter.fit([*experts, expert("b", 21)], config), hidden)
    )
    assert_same_routing(route_all(a, hidden), routed_a)  # b's rows did not land in a's tables


def test_saving_a_router_after_extending_it_writes_only_its_own_rows(tmp_path) -> None:
    old = ArrowRouter.fit([expert(f"e{i}", i) for i in range(3)], ArrowRouterConfig(top_k=2))
    old = old.extended([expert("n0", 10)])
    new = old.extended([expert("n1", 11)])  # appended in place, after old's rows
    for router, name in [(old, "old"), (new, "new")]:
        router.save(tmp_path / name)
        loaded = load_router(tmp_path / name)
        assert loaded.expert_ids == router.expert_ids
        for module in router.modules:
            assert torch.equal(loaded.vectors[module], router.vectors[module])
            assert torch.equal(loaded.members[module], router.members[module])
    assert len(load_router(tmp_path / "old").vectors["layer.0.q"]) == 4
