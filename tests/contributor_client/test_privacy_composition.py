"""The four statistics releases composed by dp_accounting's PLD accountant, not split in four,
with the budget weighted towards the second moment and its off-diagonal noise halved in variance."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from dp_accounting.pld import PLDAccountant

from moerge.contributor_client.privacy import (
    NOISE_RATIOS,
    OFF_DIAGONAL_NOISE,
    RELEASES,
    DPConfig,
    analytic_gaussian_sigma,
    noise_multiplier,
    noise_multipliers,
    noise_saved,
    noise_stds,
    privatize,
)


@pytest.mark.parametrize(("epsilon", "delta"), [(0.1, 1e-6), (1.0, 1e-5), (8.0, 1e-5)])
def test_the_composed_releases_meet_the_budget_per_an_independent_accountant(
    epsilon: float, delta: float
) -> None:
    stds = noise_stds(DPConfig(epsilon=epsilon, delta=delta, clip_norm=0.5))
    sensitivities = {"count": 1.0, "label_counts": 1.0, "sum": 0.5, "second_moment": 0.25}
    accountant = PLDAccountant(value_discretization_interval=1e-4)  # finer than the search's
    accountant.compose(
        dp_accounting.ComposedDpEvent(
            [dp_accounting.GaussianDpEvent(stds[name] / sensitivities[name]) for name in RELEASES]
        )
    )
    assert accountant.get_epsilon(delta) <= epsilon * (1 + 1e-6)


def test_the_second_moment_needs_67_percent_less_noise_than_splitting_the_budget_at_epsilon_1() -> (
    None
):
    """Composed, weighted: z = 4.88 on the second moment instead of 14.6 at epsilon 1, delta
    1e-5 (three releases of one multiplier, the first mechanism, needed 6.46)."""
    assert noise_multiplier(1.0, 1e-5) == pytest.approx(4.88, abs=0.01)
    assert analytic_gaussian_sigma(1.0 / 4, 1e-5 / 4, 1.0) == pytest.approx(14.59, abs=0.01)
    assert noise_saved(1.0, 1e-5) == pytest.approx(0.67, abs=0.01)


def test_each_release_is_noised_at_its_ratio_of_the_second_moments_multiplier() -> None:
    multipliers = noise_multipliers(8.0, 1e-5)
    for name in RELEASES:
        assert multipliers[name] == pytest.approx(NOISE_RATIOS[name] * multipliers["second_moment"])
    assert multipliers["label_counts"] > multipliers["count"] > multipliers["sum"]
    assert multipliers["sum"] > multipliers["second_moment"]


def test_the_second_moments_off_diagonal_noise_is_its_release_std_over_sqrt_2() -> None:
    """vec(M) = (M_ii, sqrt(2) M_ij) has norm ||M||_F: std s on it is s / sqrt(2) on M_ij."""
    config = DPConfig(epsilon=1.0, delta=1e-5, seed=3)
    size = 200
    release = privatize(torch.zeros(1), torch.zeros(size), torch.zeros(size, size), config)
    noisy, stds = release.second, release.noise_std
    rows, cols = torch.triu_indices(size, size, offset=1)
    off, diagonal = noisy[rows, cols], torch.diagonal(noisy)
    assert torch.equal(noisy, noisy.T)
    assert float(off.std()) / stds["second_moment"] == pytest.approx(OFF_DIAGONAL_NOISE, rel=0.02)
    assert float(diagonal.std()) / stds["second_moment"] == pytest.approx(1.0, rel=0.15)
    assert pytest.approx(1 / math.sqrt(2)) == OFF_DIAGONAL_NOISE


@pytest.mark.parametrize(
    ("epsilon", "delta"), [(0.05, 1e-8), (0.5, 1e-6), (3.0, 1e-5), (20.0, 1e-9)]
)
def test_the_accountant_never_asks_for_more_noise_than_basic_composition_nor_less_than_exact(
    epsilon: float, delta: float
) -> None:
    z = noise_multiplier(epsilon, delta)
    scale = math.sqrt(sum(r**-2 for r in NOISE_RATIOS.values()))
    exact = scale * analytic_gaussian_sigma(epsilon, delta, 1.0)  # Gaussians compose exactly
    assert exact * 0.999 <= z <= analytic_gaussian_sigma(epsilon / 4, delta / 4, 1.0)
    assert z == pytest.approx(exact, rel=2e-3)


def test_the_count_is_released_on_its_own_not_as_the_histograms_sum() -> None:
    """The count's noise does not grow with the number of labels (an error in it bends the
    covariance along the mean); the histogram, which only sets priors, takes more noise."""
    config = DPConfig(epsilon=1.0, delta=1e-5)
    histogram = torch.tensor([50.0, 30.0, 20.0, 40.0, 60.0])
    counts, labels = [], []
    for seed in range(400):
        config.seed = seed
        release = privatize(histogram, torch.zeros(4), torch.zeros(4, 4), config)
        counts.append(release.count - 200.0)
        labels.append(release.label_counts - histogram)
    stds = noise_stds(config)
    count_std = float(torch.tensor(counts).std())
    label_std = float(torch.stack(labels).std())
    assert count_std / stds["count"] == pytest.approx(1.0, rel=0.12)
    assert label_std / stds["label_counts"] == pytest.approx(1.0, rel=0.12)
    assert stds["count"] < stds["label_counts"] * math.sqrt(len(histogram))
