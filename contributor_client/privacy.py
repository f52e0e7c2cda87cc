"""Differential privacy for the uploaded statistics: the Gaussian mechanism, calibrated.

What is protected: the statistics of ``statistics.safetensors``/``statistics.json`` (count, label
counts, mean, covariance) are (epsilon, delta)-DP with respect to adding or removing one
example (one text). They are derived from four noisy releases of the clipped embeddings
``x_i`` (``||x_i|| <= C`` after clipping)::

    count         n = #{i}                          [1]                       L2 sensitivity 1
    label_counts  n_l = #{i : label_i = l}          [L] (L = 1 without labels) L2 sensitivity 1
    sum           S = sum_i x_i                     [H]                       L2 sensitivity C
    second        M = sum_i x_i x_i^T               [H, H] (see below)        L2 sensitivity C^2

The four releases are Gaussian mechanisms, each noised in proportion to its sensitivity
times its own *noise multiplier* (noise std / L2 sensitivity), ``z_r = NOISE_RATIOS[r] * z``:

* **The budget goes where the routers need it.** The second moment is what DP costs the
  statistics routers (LDA, QDA, MLP): its noise spreads over a semicircle of radius
  ``~2 z sqrt(H) / n`` that covers the covariance's small directions, the ones LDA weighs most.
  The sum only moves the mean (1.5x the second moment's multiplier). The count divides both,
  and an error ``e`` in it bends the covariance by ``e mu mu^T`` along the mean, which has a
  large norm for a single task's embeddings; so the count is released on its own (2x), not
  as the sum of the label histogram, whose noise grows with ``sqrt(L)`` and which only sets
  priors (8x). (With 200 examples per task at epsilon 1, the count taken from a histogram
  noised at 3x made LDA route 51-59% instead of 72%.)
* **The second moment is released as a vector of its upper triangle with the off-diagonal
  entries scaled by sqrt(2)**, ``vec(M) = (M_ii, sqrt(2) M_ij for i < j)``, whose L2 norm is
  ``||M||_F``; so ``vec(x x^T)`` has norm ``||x||^2 <= C^2`` and noise of std ``sigma`` on
  ``vec(M)`` puts ``sigma / sqrt(2)`` on each off-diagonal entry of ``M``, at no cost in
  privacy. (Noising the upper triangle as it is, with the same sensitivity bound, wastes that
  factor.)

Measured on the public suite (600 examples per task; benchmarks/results/dp_statistics.md): at
epsilon 8 the off-diagonal release alone moves LDA from 88.0% to 89.5% routing, with the ratios
to 90.3-90.6% (92.1% without DP). Larger ratios for the sum (2x) help no more at epsilon 8 and
cost 2-3 points at epsilon 1, where the mean's noise starts to matter.

z is the smallest value for which the four, composed, are (epsilon, delta)-DP according to
``dp_accounting``'s privacy loss distribution (PLD) accountant (Koskela et al. 2020; Doroshenko
et al. 2022), whose estimate is pessimistic, so the guarantee holds. Splitting the budget in
four instead (basic composition, each release (epsilon/4, delta/4)-DP through the analytic
Gaussian mechanism of Balle & Wang, 2018) is valid too but wasteful: at epsilon 1, delta 1e-5
it needs z = 14.6 on the second moment where the accountant and the ratios need z = 4.88.
:func:`noise_saved` reports the saving for a budget.

**On by default**: ``moerge train``/``stats``/``contribute`` release the statistics
at :data:`DEFAULT_EPSILON`, :data:`DEFAULT_DELTA` unless the contributor opts out with
``--no-dp``, which is recorded in ``statistics.json`` and shown by the coordinator; without DP,
statistics of fewer than :data:`MIN_EXAMPLES_WITHOUT_DP` examples are refused (the client here,
the coordinator at validation).

The LoRA weights and PHATGOOSE gates are trained without DP unless DP-SGD is asked for
(:mod:`moerge.contributor_client.dp_sgd`); either way :func:`privacy_report` states what was
released under which mechanism and composes every DP release with the same accountant, so one
(epsilon, delta) covers all that leaves when everything is DP.
Units are examples, not people: a person with k examples gets roughly k times the epsilon.
Noise is drawn from torch's generator (seeded from OS entropy by default), not a
cryptographically hardened float sampler.
"""

from __future__ import annotations

import functools
import math
import secrets
from dataclasses import dataclass

import dp_accounting
import torch
from dp_accounting import mechanism_calibration
from dp_accounting.pld import PLDAccountant

from moerge.expert_format import DP_MECHANISMS, PrivacyRelease, PrivacyReport

#: The statistics' default budget, chosen from benchmarks/results/dp_statistics.md: the largest
#: loss of routing accuracy we accept against the cost in privacy (see docs/security.md).
DEFAULT_EPSILON = 8.0
DEFAULT_DELTA = 1e-5
#: Without DP, statistics of fewer examples are refused: the mean of one text is its embedding.
MIN_EXAMPLES_WITHOUT_DP = 50
#: Things statistics.json carries that no mechanism here covers (documented, not hidden).
NOT_COVERED = ("label_names (taken as the task's public schema)",)

#: Releases that share the budget, and the name of each noise std in ``meta.dp.noise_std``.
RELEASES = ("count", "label_counts", "sum", "second_moment")
#: Each release's noise multiplier relative to the second moment's (see the module docstring;
#: chosen on the public suite at epsilon 8 and 1, benchmarks/results/dp_statistics.md).
NOISE_RATIOS = {"count": 2.0, "label_counts": 8.0, "sum": 1.5, "second_moment": 1.0}
#: The noise std of an off-diagonal entry of the released second moment, relative to
#: ``noise_std["second_moment"]`` (the std of the vectorised release and of a diagonal entry).
OFF_DIAGONAL_NOISE = 1.0 / math.sqrt(2.0)
MECHANISM = "gaussian_pld"  # Gaussian releases composed by the PLD accountant


@dataclass
class DPConfig:
    """Privacy budget of the statistics (see the module docstring for what it covers)."""

    epsilon: float  # total budget of the four releases, composed (see the module docstring)
    delta: float  # total failure probability; keep it well below 1 / N
    clip_norm: float = 1.0  # each embedding is scaled to at most this L2 norm before summing
    seed: int | None = None  # noise seed, for tests only (a known seed lets anyone remove it)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"epsilon must be a positive number, got {self.epsilon!r}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be a positive number, got {self.clip_norm!r}")


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    """The exact delta of the Gaussian mechanism with std ``sigma`` at ``epsilon``.

    Balle & Wang (2018), Theorem 8: ``Phi(D/2s - e s/D) - exp(e) Phi(-D/2s - e s/D)``.
    """
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    return _normal_cdf(a - b) - math.exp(epsilon) * _normal_cdf(-a - b)


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest noise std (to 1e-12 relative) making the Gaussian mechanism (eps, delta)-DP."""
    low, high = 0.0, sensitivity
    while gaussian_delta(high, epsilon, sensitivity) > delta:
        low, high = high, 2.0 * high
    while high - low > 1e-12 * high:
        middle = 0.5 * (low + high)
        if gaussian_delta(middle, epsilon, sensitivity) > delta:
            low = middle
        else:
            high = middle
    return high  # the side that satisfies the guarantee


def classic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Dwork & Roth's ``sqrt(2 ln(1.25/delta)) * sensitivity / epsilon`` (valid for eps < 1)."""
    return math.sqrt(2.0 * math.log(1.25 / delta)) * sensitivity / epsilon


def clip_rows(x: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale each row of ``x`` [N, H] down to at most ``clip_norm`` in L2 norm."""
    norms = x.norm(dim=1, keepdim=True)  # [N, 1]
    return x * (clip_norm / norms.clamp(min=clip_norm))


@functools.lru_cache(maxsize=64)  # a pure function of the budget; a search takes ~0.1-2 s
def noise_multiplier(epsilon: float, delta: float) -> float:
    """The second moment's noise multiplier z: the smallest value such that the releases, of
    multipliers ``z * NOISE_RATIOS[r]``, compose to (epsilon, delta)-DP under the PLD
    accountant.

    The search is bracketed by the exact answer (Gaussian mechanisms of multipliers ``z_r``
    compose to one of multiplier ``1 / sqrt(sum_r z_r^-2)``, which the pessimistic accountant
    never beats) and by basic composition (always valid). The discretization of the privacy
    loss grows with epsilon so that large budgets stay fast; it only makes the estimate more
    pessimistic.
    """
    scale = math.sqrt(sum(ratio**-2 for ratio in NOISE_RATIOS.values()))
    exact = scale * analytic_gaussian_sigma(epsilon, delta, 1.0)
    basic = analytic_gaussian_sigma(epsilon / len(RELEASES), delta / len(RELEASES), 1.0) / min(
        NOISE_RATIOS.values()
    )
    interval = 1e-3 * max(epsilon, 1.0)

    z = mechanism_calibration.calibrate_dp_mechanism(
        lambda: PLDAccountant(value_discretization_interval=interval),
        _releases_event,
        epsilon,
        delta,
        mechanism_calibration.ExplicitBracketInterval(0.999 * exact, basic),
        tol=1e-4 * exact,
    )
    return min(float(z), basic)


def noise_multipliers(epsilon: float, delta: float) -> dict[str, float]:
    """Each release's noise multiplier (keys ``RELEASES``) for the budget."""
    z = noise_multiplier(epsilon, delta)
    return {name: z * NOISE_RATIOS[name] for name in RELEASES}


def noise_stds(config: DPConfig) -> dict[str, float]:
    """Noise std of each release (keys ``RELEASES``) for the budget of ``config``; the second
    moment's is that of its vectorised release (off-diagonal entries: ``OFF_DIAGONAL_NOISE``
    times it)."""
    multipliers = noise_multipliers(config.epsilon, config.delta)
    c = config.clip_norm
    sensitivities = {"count": 1.0, "label_counts": 1.0, "sum": c, "second_moment": c * c}
    return {name: multipliers[name] * s for name, s in sensitivities.items()}


def noise_saved(epsilon: float, delta: float) -> float:
    """The fraction of the second moment's noise std saved over splitting the budget equally
    over the Gaussian releases (basic composition)."""
    basic = analytic_gaussian_sigma(epsilon / len(RELEASES), delta / len(RELEASES), 1.0)
    return 1.0 - noise_multiplier(epsilon, delta) / basic


@dataclass
class NoisyStatistics:
    """The four releases after noise (float64), and the noise std of each (keys ``RELEASES``)."""

    count: float  # the number of examples
    label_counts: torch.Tensor  # [L]
    total: torch.Tensor  # [H], the sum
    second: torch.Tensor  # [H, H], the second moment (symmetric)
    noise_std: dict[str, float]


def privatize(
    label_counts: torch.Tensor, total: torch.Tensor, second: torch.Tensor, config: DPConfig
) -> NoisyStatistics:
    """Release the count, ``label_counts`` [L], ``total`` [H] and ``second`` [H, H] with
    calibrated Gaussian noise (the count is ``label_counts.sum()``, released on its own).

    The inputs must come from embeddings clipped to ``config.clip_norm``.
    """
    config.validate()
    stds = noise_stds(config)
    seed = secrets.randbits(63) if config.seed is None else config.seed
    generator = torch.Generator().manual_seed(seed)

    def noise(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    # Noise of std 1 on vec(M) = (M_ii, sqrt(2) M_ij, i < j): 1 / sqrt(2) on each M_ij.
    upper = torch.triu(noise(tuple(second.shape)), diagonal=1) * OFF_DIAGONAL_NOISE  # [H, H]
    symmetric = upper + upper.T + torch.diag(noise((second.shape[0],)))  # [H, H]
    count = float(label_counts.double().sum()) + stds["count"] * float(noise((1,))[0])
    return NoisyStatistics(
        count=count,
        label_counts=label_counts.double()
        + stds["label_counts"] * noise(tuple(label_counts.shape)),
        total=total.double() + stds["sum"] * noise(tuple(total.shape)),
        second=second.double() + stds["second_moment"] * symmetric,
        noise_std=stds,
    )


def _releases_event(z: float) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z * NOISE_RATIOS[name]) for name in RELEASES]
    )


def statistics_event(config: DPConfig) -> dp_accounting.DpEvent:
    """The statistics' release as a ``dp_accounting`` event (four Gaussian mechanisms)."""
    return _releases_event(noise_multiplier(config.epsilon, config.delta))


def dp_sgd_event(noise: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """DP-SGD with Poisson sampling: ``steps`` subsampled Gaussian mechanisms."""
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise)),
        steps,
    )


def composed_epsilon(events: list[dp_accounting.DpEvent], delta: float) -> float:
    """Epsilon of all ``events`` together at ``delta``, by the PLD accountant (pessimistic)."""
    accountant = PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def bound_advantage(epsilon: float, delta: float) -> float:
    """The largest membership-inference advantage (TPR - FPR) an (epsilon, delta)-DP release
    allows: ``(e^eps - 1 + 2 delta) / (e^eps + 1)`` (from TPR <= e^eps FPR + delta and its
    mirror; Kairouz et al. 2015)."""
    return min(1.0, (math.exp(epsilon) - 1.0 + 2.0 * delta) / (math.exp(epsilon) + 1.0))


@dataclass
class SGDAccount:
    """How one DP-SGD run was noised, for the accountant (see :mod:`dp_sgd`)."""

    noise_multiplier: float  # noise std / max_grad_norm
    sample_rate: float  # Poisson sampling probability of each example per step
    steps: int
    max_grad_norm: float  # per-example gradient clipping norm
    epsilon: float  # of this run alone, at `delta`
    delta: float
    parameters: str = ""  # what the run trained, e.g. "head" or "head+lora" or "gates"
    # what computed the clipped sums: Opacus, or torch for the one-step prototype head
    library: str = "opacus"

    def event(self) -> dp_accounting.DpEvent:
        """The DP event of this DP-SGD run (Poisson-sampled Gaussian steps), for the accountant."""
        return dp_sgd_event(self.noise_multiplier, self.sample_rate, self.steps)

    def release(self, what: str) -> PrivacyRelease:
        """The run as a release of ``what`` (``adapter`` or ``gates``) in the expert's privacy
        report."""
        return PrivacyRelease(
            what=what,
            mechanism="dp_sgd",
            epsilon=round(self.epsilon, 4),
            delta=self.delta,
            details={
                "noise_multiplier": round(self.noise_multiplier, 4),
                "sample_rate": round(self.sample_rate, 6),
                "steps": self.steps,
                "max_grad_norm": self.max_grad_norm,
                "library": self.library,
                **({"parameters": self.parameters} if self.parameters else {}),
            },
        )


def privacy_report(
    statistics: DPConfig | None,
    *,
    opt_out: bool = False,
    adapter: SGDAccount | str | None = "none",
    gates: SGDAccount | str | None = None,
) -> PrivacyReport:
    """What an expert releases and under which (epsilon, delta), every DP release composed.

    ``adapter``/``gates``: an :class:`SGDAccount` (trained with DP-SGD), a mechanism name
    (``"none"``: trained here without DP; ``"external"``: brought, unknown to moerge) or None
    (not part of the expert).
    """
    releases = [
        PrivacyRelease(what="statistics", mechanism="none")
        if statistics is None
        else PrivacyRelease(
            what="statistics",
            mechanism=MECHANISM,
            epsilon=statistics.epsilon,
            delta=statistics.delta,
            details={
                "noise_multipliers": {
                    name: round(z, 4)
                    for name, z in noise_multipliers(statistics.epsilon, statistics.delta).items()
                },
                "clip_norm": statistics.clip_norm,
                "releases": list(RELEASES),
            },
        )
    ]
    events, deltas = [], []
    if statistics is not None:
        events.append(statistics_event(statistics))
        deltas.append(statistics.delta)
    for what, part in (("adapter", adapter), ("gates", gates)):
        if part is None:
            continue
        if isinstance(part, SGDAccount):
            releases.append(part.release(what))
            events.append(part.event())
            deltas.append(part.delta)
        else:
            releases.append(PrivacyRelease(what=what, mechanism=part))
    epsilon = delta = None
    if events:
        delta = sum(deltas)
        epsilon = statistics.epsilon if len(events) == 1 and statistics else None
        if epsilon is None:
            epsilon = round(composed_epsilon(events, delta), 4)
    return PrivacyReport(
        releases=releases,
        epsilon=epsilon,
        delta=delta,
        all_dp=all(r.mechanism in DP_MECHANISMS for r in releases),
        statistics_opt_out=opt_out and statistics is None,
        not_covered=list(NOT_COVERED),
    )


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))
