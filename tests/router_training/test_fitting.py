"""fit_router: configs from plain params, and data-free fit metrics."""

from __future__ import annotations

import pytest
import torch

from moerge.router_training import (
    LDARouter,
    LDARouterConfig,
    build_config,
    fit_router,
)
from tests.router_training.helpers import FAST_PARAMS, planted_experts


def test_params_build_the_method_config() -> None:
    config = build_config("lda", {"top_k": 2, "shrinkage": 0.1, "priors": "uniform"})
    assert config == LDARouterConfig(top_k=2, shrinkage=0.1, priors="uniform")


def test_unknown_params_are_named_in_the_error() -> None:
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) for method 'lda': \['bogus'"):
        fit_router("lda", planted_experts(), {"bogus": 1, "top_k": 1})


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("lda", {"shrinkage": 1.5}, "shrinkage"),
        ("qda", {"priors": "equal"}, "priors"),
        ("arrow", {"prototype_solver": "qr"}, "prototype_solver"),
        ("phatgoose", {"temperature": 0}, "temperature"),
        ("mlp", {"hidden_sizes": [0]}, "hidden_sizes"),
        ("centroid", {"score_dtype": "float16"}, "score_dtype"),
    ],
)
def test_invalid_param_values_are_rejected_naming_the_field(
    method: str, params: dict[str, object], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        build_config(method, params)


def test_example_level_fit_reports_accuracy_on_draws_from_the_gaussians() -> None:
    result = fit_router("lda", planted_experts(), FAST_PARAMS["lda"])
    assert isinstance(result.router, LDARouter)
    assert result.fit_seconds > 0
    metrics = result.metrics
    assert metrics["num_experts"] == 5
    assert metrics["sample_accuracy"] > 0.95  # planted experts are well separated
    assert metrics["sample_top_k_recall"] >= metrics["sample_accuracy"]
    assert metrics["sample_nll"] < 0.2
    assert 0 <= metrics["sample_ece"] < 0.1
    assert metrics["state_bytes"] > 0


def test_token_level_fit_reports_how_distinct_the_expert_vectors_are() -> None:
    metrics = fit_router("arrow", planted_experts()).metrics
    assert metrics["num_modules"] == 2
    # planted prototypes are nearly orthogonal
    assert metrics["vector_mean_abs_cos"] < 0.1
    assert metrics["vector_mean_abs_cos"] <= metrics["vector_max_abs_cos"] < 0.2


def test_baselines_report_only_their_size() -> None:
    assert fit_router("uniform", planted_experts()).metrics == {
        "num_experts": 5.0,
        "state_bytes": 0.0,
    }


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_by_row_maxima_equals_torch_topk(k: int) -> None:
    from moerge.router_training.base import _top_k_by_max

    scores = torch.randn(300, 1024, generator=torch.Generator().manual_seed(k))
    values, indices = _top_k_by_max(scores, k)
    expected_values, expected_indices = torch.topk(scores, k, dim=-1)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=0)
    torch.testing.assert_close(indices, expected_indices)
    assert not torch.isinf(scores).any()  # the input is left as it was


def test_a_default_top_k_above_the_expert_count_is_lowered_but_an_explicit_one_is_not() -> None:
    two = planted_experts(2)
    assert fit_router("arrow", two).router.config.top_k == 2  # Arrow's default is 3
    with pytest.raises(ValueError, match="top_k=3 exceeds"):
        fit_router("arrow", two, {"top_k": 3})
