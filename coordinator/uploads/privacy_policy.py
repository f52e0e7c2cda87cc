"""The coordinator's privacy policy for uploaded experts (docs/security.md).

An expert's ``statistics.json`` declares how its statistics were released (``dp``) and, in
files written since DP became the default, a privacy report of every release (``privacy``:
statistics, adapter, gates, each with its mechanism and (epsilon, delta), and their
composition). The coordinator cannot verify the noise, only hold the declaration to its policy:

* statistics without DP of fewer than ``min_examples_without_dp`` examples are refused (the
  mean of a handful of texts is close to their embeddings, which inversion attacks read back);
* with ``max_epsilon`` > 0, statistics without DP are refused, and so is any declared epsilon
  (of the statistics, of a DP-SGD release, or of all of them composed) above it;
* with ``require_dp_training``, an adapter or gates not trained with DP-SGD are refused.

An adapter-only expert releases no statistics: only the last rule applies to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from moerge.expert_format import PrivacyReport, StatisticsMeta


@dataclass(frozen=True)
class PrivacyPolicy:
    """What an expert's privacy report must show to be accepted (see the module docstring)."""

    min_examples_without_dp: int = 50
    max_epsilon: float = 0.0  # 0: no maximum
    require_dp_training: bool = False


def effective_report(meta: StatisticsMeta) -> PrivacyReport:
    """The expert's privacy report; for files written before there were any, derived from ``dp``."""
    if meta.privacy is not None:
        return meta.privacy
    from moerge.expert_format import PrivacyRelease

    if not meta.embedding_statistics:  # adapter-only: a PEFT folder trained elsewhere
        return PrivacyReport(releases=[PrivacyRelease(what="adapter", mechanism="external")])

    stats = (
        PrivacyRelease(what="statistics", mechanism="none")
        if meta.dp is None
        else PrivacyRelease(
            what="statistics",
            mechanism=meta.dp.mechanism,
            epsilon=meta.dp.epsilon,
            delta=meta.dp.delta,
        )
    )
    return PrivacyReport(
        releases=[stats, PrivacyRelease(what="adapter", mechanism="none")],
        epsilon=None if meta.dp is None else meta.dp.epsilon,
        delta=None if meta.dp is None else meta.dp.delta,
        all_dp=False,
        statistics_opt_out=meta.dp is None,
    )


def privacy_refusal(meta: StatisticsMeta, policy: PrivacyPolicy) -> str:
    """Why ``policy`` refuses the expert described by ``meta`` ("" when it does not)."""
    report = effective_report(meta)
    if not meta.embedding_statistics:  # adapter-only: no statistics of any data are released
        if policy.require_dp_training:
            return (
                "this coordinator requires DP-SGD training; an adapter-only expert does not "
                "say how its adapter was trained"
            )
        return ""
    if meta.dp is None and meta.example_count < policy.min_examples_without_dp:
        return (
            f"statistics without differential privacy of {meta.example_count} examples: this "
            f"coordinator needs at least {policy.min_examples_without_dp} (keep DP on: drop "
            "--no-dp)"
        )
    stats = report.release("statistics")
    if (meta.dp is None) != (stats is None or stats.mechanism == "none"):
        return "the privacy report and the 'dp' field disagree about the statistics"
    if policy.max_epsilon > 0:
        limit = policy.max_epsilon
        if meta.dp is None:
            return (
                f"this coordinator requires DP statistics (max_epsilon {limit:g}); "
                "these have none (--no-dp)"
            )
        declared = [("statistics", meta.dp.epsilon)]
        declared += [(r.what, r.epsilon) for r in report.releases if r.epsilon is not None]
        if report.epsilon is not None:
            declared.append(("everything released", report.epsilon))
        for what, epsilon in declared:
            if epsilon > limit:
                return f"{what}: epsilon {epsilon:g} exceeds this coordinator's maximum {limit:g}"
    if policy.require_dp_training:
        for r in report.releases:
            if r.what in ("adapter", "gates") and r.mechanism != "dp_sgd":
                return (
                    f"this coordinator requires DP-SGD training; the {r.what} was trained "
                    f"with mechanism {r.mechanism!r} (use --dp-sgd-epsilon)"
                )
    return ""
