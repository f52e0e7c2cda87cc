"""The three statistics releases composed by dp_accounting's PLD accountant, not split in three."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant

from moerge.contributor_client.privacy import (
    RELEASES,
    DPConfig,
    analytic_gaussian_sigma,
    noise_multiplier,
    noise_saved,
    noise_stds,
)


@pytest.mark.parametrize(("epsilon", "delta"), [(0.1, 1e-6), (1.0, 1e-5), (8.0, 1e-5)])
def test_the_composed_releases_meet_the_budget_per_an_independent_accountant(
    epsilon: float, delta: float
) -> None:
    stds = noise_stds(DPConfig(epsilon=epsilon, delta=delta, clip_norm=0.5))
    sensitivities = {"count": 1.0, "sum": 0.5, "second_moment": 0.25}
    accountant = PLDAccountant(value_discretization_interval=1e-4)  # finer than the search's
    accountant.compose(
        dp_accounting.ComposedDpEvent(
            [dp_accounting.GaussianDpEvent(stds[name] / sensitivities[name]) for name in RELEASES]
        )
    )
    assert accountant.get_epsilon(delta) <= epsilon * (1 + 1e-6)


def test_composition_needs_41_percent_less_noise_than_splitting_the_budget_at_epsilon_1() -> None:
    """Composing the releases: sigma 6.46 instead of 10.97 at epsilon 1, delta 1e-5."""
    assert noise_multiplier(1.0, 1e-5) == pytest.approx(6.46, abs=0.01)
    assert analytic_gaussian_sigma(1.0 / 3, 1e-5 / 3, 1.0) == pytest.approx(10.97, abs=0.01)
    assert noise_saved(1.0, 1e-5) == pytest.approx(0.41, abs=0.01)


@pytest.mark.parametrize(
    ("epsilon", "delta"), [(0.05, 1e-8), (0.5, 1e-6), (3.0, 1e-5), (20.0, 1e-9)]
)
def test_the_accountant_never_asks_for_more_noise_than_basic_composition_nor_less_than_exact(
    epsilon: float, delta: float
) -> None:
    z = noise_multiplier(epsilon, delta)
    exact = 3**0.5 * analytic_gaussian_sigma(epsilon, delta, 1.0)  # Gaussians compose exactly
    assert exact * 0.999 <= z <= analytic_gaussian_sigma(epsilon / 3, delta / 3, 1.0)
    assert z == pytest.approx(exact, rel=2e-3)
