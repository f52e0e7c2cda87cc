"""The privacy that a federated router's DP rounds spent, as (epsilon, delta).

Each released round under central DP (``dp`` != ``"none"``) is one Gaussian mechanism on the
average of the ``n`` sampled contributors' clipped updates: with every contributor weighing the
same (:data:`~.flower_server.UNIT_WEIGHT`), adding or removing one contributor moves the average
by at most ``clipping_norm / n``, and the noise std is ``noise_multiplier * clipping_norm / n``,
so each round is a Gaussian mechanism of noise multiplier ``sigma = noise_multiplier``
(McMahan et al., 2018, "Learning Differentially Private Recurrent Language Models"). ``T``
released rounds compose under Rényi DP (Mironov, 2017); no amplification by sampling is
claimed, as Flower samples a fixed number of contributors rather than by Poisson sampling.
The accountant is Flower's (``flwr[dp]``: Google's ``dp_accounting``), configured for exactly
that: ``sampling_method="no-amplification"``, neighbours differing by one contributor.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

__all__ = ["RoundsPrivacy", "rounds_privacy"]


@dataclass(frozen=True)
class RoundsPrivacy:
    """(epsilon, delta)-DP of a contributor's participation in the released router."""

    epsilon: float
    delta: float
    released_rounds: int
    noise_multiplier: float


def rounds_privacy(
    noise_multiplier: float, released_rounds: int, sampled: int, population: int, delta: float
) -> RoundsPrivacy:
    """The epsilon at ``delta`` after ``released_rounds`` rounds of ``sampled`` contributors
    (out of ``population``) with noise multiplier ``noise_multiplier`` (> 0)."""
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    if released_rounds:
        event = GaussianPrivacyEvent(noise_multiplier, sampled, population)
        accountant.compose(event, count=released_rounds)
        epsilon = accountant.get_epsilon(delta)
    else:
        epsilon = 0.0
    return RoundsPrivacy(epsilon, delta, released_rounds, noise_multiplier)
