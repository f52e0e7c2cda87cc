"""Consistency checks against poisoned experts: statistics that lie, gates scaled up.

Routers trust what contributors upload. A poisoner can try to capture other experts' traffic by
(a) placing its uploaded mean on another expert's centroid (a centroid or Gaussian router then
sends that expert's inputs to it too), or (b) scaling its PHATGOOSE gates up so that its
sigmoid gates win. These are plain functions over :class:`ExpertRecord` statistics (no
registry, no network); :mod:`moerge.coordinator.uploads.screening` runs them at upload commit
and before each router fit, and quarantines what they flag.

**Mean copies** (:func:`mean_copies`). Expert ``e`` uploads the mean ``mu_e`` of its ``n_e``
embeddings and their covariance ``Sigma_e = U_e U_e^T + diag(D_e)`` [H, H]. Two experts whose
data were sampled independently, even from the *same* distribution, have means that differ by
sampling noise: ``mu_a - mu_b ~ N(delta, S)`` with ``S = Sigma_a / n_a + Sigma_b / n_b`` (plus
``sigma^2 I`` per mean released with differential privacy). ``||mu_a - mu_b||^2`` is then a
weighted sum of chi-square variables; with Satterthwaite's approximation it is ``c * chi2_k``
with ``c * k = tr S`` and ``k = (tr S)^2 / tr(S^2)``. Its lower tail is largest for
``delta = 0`` and, for small ``x``, ``P(chi2_k < x) ~= (x / 2)^(k/2) / Gamma(k/2 + 1)``, so a
squared distance below ``c * x_p`` with ``x_p = 2 (p Gamma(k/2 + 1))^(2/k)`` happens to honest,
independent experts with probability at most ``p``: one mean was copied from (or built on) the
other. The later expert of the pair is flagged. Pairs of one contributor are not compared (a new
version may reuse its data). Two contributors who upload experts trained on *the same* data set
are flagged too: their statistics are not independent, and an admin should look.

**Gate norms** (:func:`gate_outliers`). An honest PHATGOOSE gate vector's norm comes from the same
training recipe as every other expert's. For each module, ``log ||g_e||`` is compared with the
median over experts; an expert's score is the mean of that over its modules, and it is flagged
when its score is both a robust outlier among the *other* experts' scores (``(s - median) /
(1.4826 MAD) > z``) and at least ``ratio`` times the median norm (which guards a tight cluster
whose MAD is near zero). Only scaling *up* is flagged: it is the direction that captures traffic.

Why not check a mean against the expert's own classification head: the mean is of base-model
embeddings while the head reads adapted ones, and a softmax of the mean is not the mean of the
softmax, so the expected label distribution is not implied by the statistics. What is not
caught: a mean moved *near* a centroid by more than sampling noise, gates scaled by less than
``ratio``, or scaled on a few modules only (see ``docs/security.md``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from moerge.router_training.base import ExpertRecord, ExpertStatistics

MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass(frozen=True)
class Finding:
    """One expert flagged by one check, with a reason an admin can read."""

    expert_id: str
    check: str  # "mean_copy" | "gate_norm"
    reason: str


@dataclass(frozen=True)
class ConsistencyConfig:
    """Thresholds (see the module docstring for the statistics)."""

    copy_p_value: float = 1e-6  # chance that two honest, independent experts are flagged
    gate_z: float = 3.5  # robust z-score of its gate norms among the others (Iglewicz-Hoaglin)
    gate_ratio: float = 3.0  # ...and at least this times the others' median norm
    min_peers: int = 4  # other experts with gates needed before gate norms are judged


def _stats(record: ExpertRecord) -> ExpertStatistics:
    assert record.statistics is not None, f"expert {record.expert_id} has no statistics"
    return record.statistics


def _noise_factor(stats: ExpertStatistics) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [H, k], d [H])`` with ``Cov(mu) = W W^T + diag(d)``: sampling plus DP noise."""
    n = max(stats.example_count, 1)
    dp_sigma = stats.dp_noise_std.get("sum", 0.0) / n  # a DP sum's noise, divided by n
    factor = stats.cov_factor.double().reshape(stats.mean.shape[0], -1) / math.sqrt(n)
    return factor, stats.cov_diag.double() / n + dp_sigma**2


def _mean_noise_trace(stats: ExpertStatistics) -> float:
    factor, diag = _noise_factor(stats)
    return float(factor.square().sum() + diag.sum())


def copy_threshold(a: ExpertStatistics, b: ExpertStatistics, p: float) -> float:
    """The squared distance of two honest means that is undercut with probability ``p``."""
    factor_a, diag_a = _noise_factor(a)
    factor_b, diag_b = _noise_factor(b)
    w = torch.cat([factor_a, factor_b], dim=1)  # S = W W^T + diag(d), W [H, k_a + k_b]
    d = diag_a + diag_b
    trace = float((w * w).sum() + d.sum())
    trace_sq = float((w.T @ w).square().sum() + 2 * (d * (w * w).sum(1)).sum() + d.square().sum())
    if trace <= 0 or trace_sq <= 0:
        return 0.0
    k = trace**2 / trace_sq
    x_p = 2 * math.exp((math.log(p) + math.lgamma(k / 2 + 1)) * 2 / k)
    return trace / k * min(x_p, k)


def mean_copies(
    records: Sequence[ExpertRecord],
    owners: Mapping[str, str],
    config: ConsistencyConfig,
    candidates: set[str] | None = None,
) -> list[Finding]:
    """Experts whose mean is implausibly close to an earlier expert's of another contributor.

    ``records`` are oldest first; ``owners`` maps expert id to contributor id. Only experts in
    ``candidates`` (default: all) can be flagged.
    """
    if len(records) < 2:
        return []
    means = torch.stack([_stats(r).mean.double() for r in records])  # [E, H]
    traces = torch.tensor([_mean_noise_trace(_stats(r)) for r in records], dtype=torch.float64)
    distances = torch.cdist(means, means).square()  # [E, E]
    # Cheap filter: the threshold never exceeds tr(S), so only nearer pairs need the test.
    near = (distances < traces[:, None] + traces[None, :]).triu(diagonal=1)  # [E, E], i < j
    findings = []
    for j, later in enumerate(records):
        if candidates is not None and later.expert_id not in candidates:
            continue
        for i in near[:, j].nonzero().flatten().tolist():
            earlier = records[i]
            if owners.get(earlier.expert_id) == owners.get(later.expert_id):
                continue
            limit = copy_threshold(_stats(earlier), _stats(later), config.copy_p_value)
            if distances[i, j] < limit:
                findings.append(
                    Finding(
                        later.expert_id,
                        "mean_copy",
                        f"consistency check: its statistics mean lies within sampling noise of "
                        f"expert {earlier.expert_id} (another contributor's): squared distance "
                        f"{float(distances[i, j]):.3g} < {limit:.3g}, which independent data "
                        f"undercut with probability {config.copy_p_value:g}",
                    )
                )
                break
    return findings


def gate_scores(records: Sequence[ExpertRecord]) -> dict[str, float]:
    """Mean over modules of ``log ||g_e,m|| - median_e' log ||g_e',m||`` per expert with gates."""
    by_module: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for record in records:
        for module, gate in _stats(record).gates.items():
            by_module.setdefault(module, []).append((record.expert_id, gate))
    offsets: dict[str, list[float]] = {}
    for gates in by_module.values():
        vectors = torch.stack([g.reshape(-1) for _, g in gates]).double()  # [E_m, d_in]
        logs = vectors.norm(dim=1).clamp_min(1e-30).log()  # [E_m]
        for (expert_id, _), offset in zip(gates, (logs - logs.median()).tolist(), strict=True):
            offsets.setdefault(expert_id, []).append(offset)
    return {expert_id: sum(v) / len(v) for expert_id, v in offsets.items()}


def gate_outliers(
    records: Sequence[ExpertRecord], config: ConsistencyConfig, candidates: set[str] | None = None
) -> list[Finding]:
    """Experts whose PHATGOOSE gate norms are far above the other experts' (robust z-score)."""
    scores = gate_scores(records)
    findings = []
    for expert_id, score in scores.items():
        if candidates is not None and expert_id not in candidates:
            continue
        others = [s for e, s in scores.items() if e != expert_id]
        if len(others) < config.min_peers:
            continue
        median = statistics.median(others)
        mad = statistics.median(abs(s - median) for s in others)
        excess = score - median
        z = excess / (MAD_TO_STD * mad) if mad > 0 else math.inf
        if z > config.gate_z and excess > math.log(config.gate_ratio):
            findings.append(
                Finding(
                    expert_id,
                    "gate_norm",
                    f"consistency check: its PHATGOOSE gate norms are {math.exp(excess):.1f}x "
                    f"the median of {len(others)} other experts (robust z-score "
                    f"{min(z, 1e9):.1f} > {config.gate_z:g})",
                )
            )
    return findings


def screen(
    records: Sequence[ExpertRecord],
    owners: Mapping[str, str],
    config: ConsistencyConfig,
    candidates: set[str] | None = None,
) -> list[Finding]:
    """Every check; at most one finding per expert (the first check that flags it)."""
    findings: dict[str, Finding] = {}
    for finding in [
        *mean_copies(records, owners, config, candidates),
        *gate_outliers(records, config, candidates),
    ]:
        findings.setdefault(finding.expert_id, finding)
    return list(findings.values())
