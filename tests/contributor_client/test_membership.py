"""Membership inference against the released statistics, at the defaults: the
attack's advantage stays within what the DP budget allows, and matches the exact value of the
optimal test; without DP a small release is read off."""

from __future__ import annotations

import torch

from moerge.contributor_client.membership import (
    advantage,
    gdp_advantage,
    population_attack,
    worst_case_attack,
)
from moerge.contributor_client.privacy import DEFAULT_DELTA, DEFAULT_EPSILON, DPConfig


def _population(count: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Unit vectors around a common direction, like the embeddings of one task."""
    generator = torch.Generator().manual_seed(seed)
    centre = torch.randn(size, generator=generator)
    points = centre + 0.8 * torch.randn(count, size, generator=generator)
    return torch.nn.functional.normalize(points, dim=1)


def test_advantage_is_the_best_threshold() -> None:
    assert advantage(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert advantage(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.5  # ties
    assert advantage(torch.tensor([1.0]), torch.tensor([2.0])) == 0.0


def test_the_strongest_attacker_stays_within_the_dp_bound_at_the_defaults() -> None:
    data = _population(60, size=8)
    config = DPConfig(epsilon=DEFAULT_EPSILON, delta=DEFAULT_DELTA)
    result = worst_case_attack(data[1:], data[0], config, trials=1200, seed=1)
    assert result.dp_bound is not None and result.exact is not None
    # The likelihood-ratio test is optimal: it reaches the exact advantage of the Gaussian
    # releases, which the (epsilon, delta) bound must (and does, loosely) cover.
    assert abs(result.advantage - result.exact) < 4 * result.standard_error
    assert result.advantage <= result.dp_bound
    assert result.exact == gdp_advantage(config)  # a unit-norm candidate is clipped to 1


def test_without_dp_the_strongest_attacker_always_wins() -> None:
    data = _population(60, size=8)
    result = worst_case_attack(data[1:], data[0], None, trials=20)
    assert result.advantage == 1.0 and result.dp_bound is None


def test_a_population_attacker_reads_a_small_release_without_dp_but_not_with_it() -> None:
    people = _population(400)
    members, others, reference = people[:5], people[5:10], people[200:]
    plain = population_attack(members, others, reference, None, releases=1)
    private = population_attack(
        members, others, reference, DPConfig(DEFAULT_EPSILON, DEFAULT_DELTA), releases=300
    )
    assert plain.advantage >= 0.6
    assert private.advantage < plain.advantage and private.advantage <= private.dp_bound
