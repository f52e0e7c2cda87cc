"""Membership-inference attacks on what an expert releases, beside the DP bound.

Two attackers on the statistics, both run against the releases of :func:`privacy.privatize`
(count, label counts, sum, second moment *before* moerge derives mean and covariance from
them; anything derived is post-processing, so an attack on the raw releases is at least as
strong):

* :func:`worst_case_attack`, the adversary of the DP definition: it knows every example but
  one candidate ``x`` and must tell whether ``x`` was in the data. The likelihood-ratio test
  (Neyman-Pearson optimal, so the strongest possible test against these releases) subtracts
  the known part and scores the residual of each release against ``x``'s contribution. Its
  advantage (TPR - FPR at the best threshold) must stay within :func:`privacy.bound_advantage`
  of the budget; :func:`gdp_advantage` is the exact value for Gaussian releases.
* :func:`population_attack`, a realistic adversary: it knows the population (held-out texts
  of the same task), not the other members, and scores a candidate by how far the released
  mean leans towards it (the attack of Homer et al. 2008 on summary statistics). Without DP it
  shows how much a small release leaks; with DP it stays within the bound too.

And one on the adapter, :func:`loss_attack` (Yeom et al. 2018): members have a lower loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moerge.contributor_client.privacy import (
    DPConfig,
    bound_advantage,
    clip_rows,
    noise_multipliers,
    privatize,
)


@dataclass
class AttackResult:
    """An attack's empirical advantage beside what the budget allows."""

    advantage: float  # max over thresholds of TPR - FPR on the trials
    trials: int  # member + non-member trials
    dp_bound: float | None  # (epsilon, delta) bound on any attack's advantage; None without DP
    exact: float | None = None  # the optimal test's advantage where it is known in closed form

    @property
    def standard_error(self) -> float:
        """About the sampling error of ``advantage`` (two proportions of trials / 2 each)."""
        return math.sqrt(2 * 0.25 / max(self.trials / 2, 1))


def advantage(member_scores: torch.Tensor, other_scores: torch.Tensor) -> float:
    """max over thresholds t of P(member score > t) - P(non-member score > t)."""
    scores = torch.cat([member_scores, other_scores]).double()
    is_member = torch.cat([torch.ones(len(member_scores)), torch.zeros(len(other_scores))])
    order = torch.argsort(scores, descending=True)
    tpr = torch.cumsum(is_member[order], 0) / max(len(member_scores), 1)
    fpr = torch.cumsum(1 - is_member[order], 0) / max(len(other_scores), 1)
    return float(max(0.0, float((tpr - fpr).max())))


def gdp_advantage(config: DPConfig, norm: float = 1.0) -> float:
    """The optimal test's advantage against one example of L2 norm ``norm`` (after clipping):
    the four releases are together a Gaussian shift of
    ``mu = sqrt(z_count^-2 + z_labels^-2 + n^2 z_sum^-2 + n^4 z_second^-2)`` (in units of the
    clip norm, ``n = norm / C``), so the advantage is ``2 Phi(mu / 2) - 1``."""
    z = noise_multipliers(config.epsilon, config.delta)
    n = min(norm, config.clip_norm) / config.clip_norm
    mu = math.sqrt(
        z["count"] ** -2
        + z["label_counts"] ** -2
        + (n / z["sum"]) ** 2
        + (n * n / z["second_moment"]) ** 2
    )
    return math.erf(mu / (2 * math.sqrt(2)))


def _vectorised(matrix: torch.Tensor) -> torch.Tensor:
    """``vec(M) = (M_ii, sqrt(2) M_ij for i < j)``: the space in which the second moment's
    noise is i.i.d. (see :func:`privacy.privatize`)."""
    size = matrix.shape[0]
    rows, cols = torch.triu_indices(size, size, offset=1)
    return torch.cat([torch.diagonal(matrix), math.sqrt(2.0) * matrix[rows, cols]])


def worst_case_attack(
    known: torch.Tensor,
    candidate: torch.Tensor,
    config: DPConfig | None,
    trials: int,
    seed: int = 0,
) -> AttackResult:
    """The DP adversary: ``known`` [n-1, H] are the other examples, ``candidate`` [H] the one
    it asks about. Each trial releases the statistics of ``known`` (odd trials) or ``known`` +
    ``candidate`` (even trials) with fresh noise and scores the release with the likelihood
    ratio. Without DP the release is exact and the attacker always wins."""
    x = known.double()
    c = candidate.double().unsqueeze(0)
    if config is not None:
        x, c = clip_rows(x, config.clip_norm), clip_rows(c, config.clip_norm)
    c = c[0]
    base_sum, base_second = x.sum(0), x.T @ x
    with_sum, with_second = base_sum + c, base_second + torch.outer(c, c)
    members: list[float] = []
    others: list[float] = []
    for trial in range(trials):
        member = trial % 2 == 0
        counts = torch.tensor([len(x) + (1.0 if member else 0.0)])
        total, second = (with_sum, with_second) if member else (base_sum, base_second)
        if config is None:
            stds = dict.fromkeys(("count", "label_counts", "sum", "second_moment"), 0.0)
            n_count, n_labels, n_total, n_second = counts.sum(), counts, total, second
        else:
            one = DPConfig(
                config.epsilon, config.delta, config.clip_norm, seed=seed * 1_000_003 + trial
            )
            noisy = privatize(counts, total, second, one)
            n_count, n_labels = torch.tensor([noisy.count]), noisy.label_counts
            n_total, n_second, stds = noisy.total, noisy.second, noisy.noise_std
        score = _likelihood_ratio(
            [
                (torch.atleast_1d(n_count - len(x)).double(), _one(), stds["count"]),
                (n_labels - len(x), _one(), stds["label_counts"]),
                (n_total - base_sum, c, stds["sum"]),
                (
                    _vectorised(n_second - base_second),
                    _vectorised(torch.outer(c, c)),
                    stds["second_moment"],
                ),
            ]
        )
        (members if member else others).append(score)
    return AttackResult(
        advantage=advantage(torch.tensor(members), torch.tensor(others)),
        trials=trials,
        dp_bound=None if config is None else bound_advantage(config.epsilon, config.delta),
        exact=1.0 if config is None else gdp_advantage(config, float(candidate.norm())),
    )


def _one() -> torch.Tensor:
    return torch.ones(1, dtype=torch.float64)


def _likelihood_ratio(releases: list[tuple[torch.Tensor, torch.Tensor, float]]) -> float:
    """log p(residuals | member) - log p(residuals | not) over ``(residual, shift, std)`` per
    release (the member's contribution ``shift``, Gaussian noise): linear in the residuals."""
    score = 0.0
    for residual, shift, std in releases:
        if std == 0.0:  # an exact release: the residual is either 0 or the shift
            score += 1e9 if float((residual - shift).abs().max()) < 1e-6 else -1e9
            continue
        score += float((residual @ shift - 0.5 * shift @ shift) / std**2)
    return score


def population_attack(
    members: torch.Tensor,
    non_members: torch.Tensor,
    reference: torch.Tensor,
    config: DPConfig | None,
    releases: int,
    seed: int = 0,
) -> AttackResult:
    """The realistic adversary: ``releases`` times, a data set of ``members`` [n, H] is
    released; the attacker scores each member and each of ``non_members`` [m, H] (same
    population, never released) by ``<x, mean_released - mean_reference>``, ``reference``
    [r, H] being what it knows of the population. Advantage over all scored candidates."""
    from moerge.contributor_client.statistics import summarize_embeddings

    reference_mean = reference.double().mean(0)
    scores_in, scores_out = [], []
    for release in range(releases):
        dp = None
        if config is not None:
            dp = DPConfig(
                config.epsilon, config.delta, config.clip_norm, seed=seed * 7919 + release
            )
        mean = summarize_embeddings(members, rank=0, dp=dp).mean
        direction = mean - reference_mean
        scores_in.append(members.double() @ direction)
        scores_out.append(non_members.double() @ direction)
    return AttackResult(
        advantage=advantage(torch.cat(scores_in), torch.cat(scores_out)),
        trials=releases * (len(members) + len(non_members)),
        dp_bound=None if config is None else bound_advantage(config.epsilon, config.delta),
    )


def loss_attack(member_losses: torch.Tensor, other_losses: torch.Tensor) -> float:
    """Yeom et al.'s attack on a trained model: a lower loss says "member"."""
    return advantage(-member_losses, -other_losses)
