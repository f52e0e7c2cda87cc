"""Contract tests run over every registered routing method (cf. PEFT's test_custom_models)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

import moerge.router_training
from moerge.router_training import (
    Router,
    available_methods,
    fit_router,
    get_router_class,
    load_router,
)
from tests.router_training.helpers import FAST_PARAMS, NUM_EXPERTS, planted_experts, route_any

METHODS = available_methods()


def invalid_top_ks(method: str) -> list[int]:
    if method == "base":  # the only router whose single valid k is 0
        return [-1, 1, NUM_EXPERTS + 1]
    return [-1, 0, NUM_EXPERTS + 1]


def valid_top_ks(method: str) -> list[int]:
    return {"base": [0], "uniform": [NUM_EXPERTS], "oracle": [1]}.get(
        method, list(range(1, NUM_EXPERTS + 1))
    )


@pytest.fixture(scope="module")
def fitted() -> dict[str, Router]:
    experts = planted_experts()
    return {m: fit_router(m, experts, FAST_PARAMS.get(m, {})).router for m in METHODS}


def declared_methods() -> set[str]:
    """The ``method`` of every router class defined in a module of moerge.router_training."""
    names = set()
    for module_info in pkgutil.iter_modules(moerge.router_training.__path__):
        module = importlib.import_module(f"moerge.router_training.{module_info.name}")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, Router)
                and value.__module__ == module.__name__
                and "method" in vars(value)
            ):
                names.add(value.method)
    return names


def test_importing_the_package_registers_every_method_its_modules_define() -> None:
    # METHODS is read when this file is collected, after ``import moerge.router_training``; a
    # method module that __init__.py forgets to import is registered only by the walk below.
    assert METHODS
    assert set(METHODS) == declared_methods()


def test_unknown_method_error_lists_known_methods() -> None:
    with pytest.raises(ValueError, match="known methods: arrow, base, centroid"):
        get_router_class("no-such-method")


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_gives_identical_decisions(
    method: str, fitted: dict[str, Router], tmp_path
) -> None:
    router = fitted[method]
    path = tmp_path / f"{method}.safetensors"
    router.save(path)
    loaded = load_router(path)
    assert type(loaded) is type(router)
    assert loaded.expert_ids == router.expert_ids
    assert loaded.config == router.config
    for k in valid_top_ks(method):
        before, after = route_any(router, 12, k), route_any(loaded, 12, k)
        assert torch.equal(before.indices, after.indices)
        assert torch.equal(before.weights, after.weights)


@pytest.mark.parametrize("method", METHODS)
def test_weights_are_a_distribution_over_distinct_valid_experts(
    method: str, fitted: dict[str, Router]
) -> None:
    router = fitted[method]
    for k in valid_top_ks(method):
        decision = route_any(router, 12, k)
        assert decision.indices.dtype == torch.long
        assert decision.indices.shape == decision.weights.shape == (12, k)
        assert bool((decision.weights >= 0).all())
        if k:
            torch.testing.assert_close(decision.weights.sum(-1), torch.ones(12))
            assert int(decision.indices.min()) >= 0
            assert int(decision.indices.max()) < router.num_experts
            assert all(len(set(row.tolist())) == k for row in decision.indices)
        dense = decision.to_dense(router.num_experts)
        torch.testing.assert_close(dense.sum(-1), torch.full((12,), float(k > 0)))


@pytest.mark.parametrize("method", METHODS)
def test_top_k_out_of_range_raises_value_error(method: str, fitted: dict[str, Router]) -> None:
    experts = planted_experts()
    for k in invalid_top_ks(method):
        with pytest.raises(ValueError, match="top_k"):
            route_any(fitted[method], 4, k)
        with pytest.raises(ValueError, match="top_k"):
            fit_router(method, experts, {**FAST_PARAMS.get(method, {}), "top_k": k})


@pytest.mark.parametrize("method", METHODS)
def test_fitting_twice_gives_the_same_router(method: str, fitted: dict[str, Router]) -> None:
    again = fit_router(method, planted_experts(), FAST_PARAMS.get(method, {})).router
    first, second = fitted[method].state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("base", "uniform", "oracle")])
def test_planted_inputs_route_to_their_expert(method: str, fitted: dict[str, Router]) -> None:
    decision = route_any(fitted[method], 30, 1)
    expected = torch.arange(NUM_EXPERTS).repeat_interleave(6)
    assert torch.equal(decision.indices[:, 0], expected)


def test_oracle_routes_each_example_to_its_source_and_refuses_embeddings(
    fitted: dict[str, Router],
) -> None:
    oracle = fitted["oracle"]
    assert oracle.evaluation_only
    decision = oracle.route_sources(["expert-3", "expert-0", "expert-3"])  # type: ignore[attr-defined]
    assert decision.indices[:, 0].tolist() == [3, 0, 3]
    assert decision.weights[:, 0].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown source expert"):
        oracle.route_sources(["nobody"])  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="route_sources"):
        oracle.route_examples(torch.zeros(2, 16))


def test_uniform_weights_every_expert_equally_and_base_uses_none(
    fitted: dict[str, Router],
) -> None:
    uniform = fitted["uniform"].route_examples(torch.zeros(3, 16))
    assert uniform.indices.tolist() == [list(range(NUM_EXPERTS))] * 3
    torch.testing.assert_close(uniform.weights, torch.full((3, NUM_EXPERTS), 1 / NUM_EXPERTS))
    base = fitted["base"].route_tokens("any.module", torch.zeros(7, 4))
    assert base.indices.shape == (7, 0) and base.k == 0


def test_duplicate_expert_ids_are_rejected() -> None:
    experts = planted_experts(2)
    experts[1].expert_id = experts[0].expert_id
    with pytest.raises(ValueError, match="duplicate expert ids"):
        fit_router("centroid", experts)


def test_token_router_rejects_unknown_module_and_wrong_width(fitted: dict[str, Router]) -> None:
    arrow = fitted["arrow"]
    with pytest.raises(ValueError, match="known modules"):
        arrow.route_tokens("encoder.layer.9.output.dense", torch.zeros(2, 16))
    with pytest.raises(ValueError, match="expects hidden states"):
        arrow.route_tokens(arrow.modules[0], torch.zeros(2, 15))


def test_a_method_name_cannot_be_registered_twice() -> None:
    from moerge.router_training.methods import register_router

    class Impostor(get_router_class("centroid")):  # type: ignore[misc, valid-type]
        method = "centroid"

    with pytest.raises(ValueError, match="already registered"):
        register_router(Impostor)
    assert get_router_class("centroid").__name__ == "CentroidRouter"
