"""Fit any registered router by name, with cheap metrics that need no raw data.

``fit_router(method, experts, params)`` builds the method's config from ``params`` (a plain dict,
e.g. from the coordinator's YAML or an API call), fits, times the fit and computes metrics:

* always: ``num_experts``, ``state_bytes`` (size of the router's tensors);
* example-level routers that route embeddings (``centroid``, ``lda``, ``qda``, ``mlp``), when
  every expert has statistics: routing quality on ``metric_samples`` labelled draws from the
  experts' uploaded Gaussians (the count-weighted mixture, seeded, independent of the fit):
  ``sample_accuracy`` (top-1 expert is the source), ``sample_top_k_recall`` (source among the
  top-k), ``sample_mean_top_weight`` (mean weight of the first choice); and for the posterior
  routers also ``sample_nll`` and ``sample_ece`` (top-1 expected calibration error) of the full
  posterior, and ``temperature``;
* ``skipped_experts``: experts the method cannot learn from (adapter-only experts for the
  statistics routers, experts without gates for ``phatgoose``); they are left out of the router
  and :attr:`FitResult.skipped` says why (:func:`routable_experts`);
* token-level routers (``arrow``, ``phatgoose``): ``num_modules``, ``zero_vector_experts``
  (experts whose vectors are all zero, e.g. a LoRA update of zero: the router knows nothing
  about them; see :meth:`ModuleVectorRouter.zero_vector_experts`) and the mean / max ``|cos|``
  between different experts' vectors in a module (``vector_mean_abs_cos``,
  ``vector_max_abs_cos``) -- near-parallel prototypes cannot be told apart by the router.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.router_training.base import (
    ExpertRecord,
    Router,
    RouterConfig,
    missing_input,
    top_k_softmax,
)
from moerge.router_training.calibration import expected_calibration_error
from moerge.router_training.centroid import CentroidRouter
from moerge.router_training.gaussian import GaussianBank, GaussianRouter
from moerge.router_training.methods import get_router_class
from moerge.router_training.token_router import ModuleVectorRouter

#: Labelled draws from the experts' Gaussians used for the fit metrics.
METRIC_SAMPLES = 2048
METRIC_SEED = 12345


@dataclass
class FitResult:
    """A fitted router, its fit metrics (name -> float) and the fit's wall-clock seconds."""

    router: Router
    metrics: dict[str, float] = field(default_factory=dict)
    fit_seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)  # expert id -> why it is left out


def routable_experts(
    method: str, experts: Sequence[ExpertRecord]
) -> tuple[list[ExpertRecord], dict[str, str]]:
    """The experts ``method`` can learn from, and ``{expert id: why not}`` for the others.

    Raises ``ValueError`` when none is left, naming what the method needs.
    """
    needs = get_router_class(method).needs
    kept, skipped = [], {}
    for expert in experts:
        reason = missing_input(needs, expert)
        if reason:
            skipped[expert.expert_id] = reason
        else:
            kept.append(expert)
    if experts and not kept:
        raise ValueError(
            f"router '{method}' learns from {needs} and none of the {len(experts)} experts has "
            f"it (e.g. {next(iter(skipped))}: {next(iter(skipped.values()))})"
        )
    return kept, skipped


def build_config(method: str, params: Mapping[str, Any] | None = None) -> RouterConfig:
    """The config of ``method`` from ``params``; ``ValueError`` naming unknown or bad params."""
    cls = get_router_class(method)
    params = dict(params or {})
    known = {f.name for f in dataclasses.fields(cls.config_class) if f.init}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) for method '{method}': {unknown}; known: {sorted(known)}"
        )
    config = cls.config_class(**params)
    config.validate()
    return config


def fit_router(
    method: str,
    experts: Sequence[ExpertRecord],
    params: Mapping[str, Any] | None = None,
    metric_samples: int = METRIC_SAMPLES,
) -> FitResult:
    """Fit ``method`` over ``experts`` with ``params``; see the module docstring for metrics.

    A default ``top_k`` larger than the number of experts (Arrow's 3 over a registry of two)
    is lowered to that number; a ``top_k`` given in ``params`` is checked as it is. Experts the
    method cannot learn from are left out (:func:`routable_experts`).
    """
    config = build_config(method, params)
    experts, skipped = routable_experts(method, experts)
    default_k = getattr(config, "top_k", None)
    if "top_k" not in (params or {}) and isinstance(default_k, int) and default_k > len(experts):
        config = dataclasses.replace(config, top_k=max(len(experts), 1))
    cls = get_router_class(method)
    start = time.perf_counter()
    router = cls.fit(experts, config)
    fit_seconds = time.perf_counter() - start
    metrics = fit_metrics(router, experts, metric_samples)
    if skipped:
        metrics["skipped_experts"] = float(len(skipped))
    return FitResult(router=router, metrics=metrics, fit_seconds=fit_seconds, skipped=skipped)


def fit_metrics(
    router: Router, experts: Sequence[ExpertRecord], metric_samples: int = METRIC_SAMPLES
) -> dict[str, float]:
    """Cheap, data-free quality metrics of a fitted router (see the module docstring)."""
    metrics: dict[str, float] = {
        "num_experts": float(router.num_experts),
        "state_bytes": float(
            sum(t.numel() * t.element_size() for t in router.state_dict().values())
        ),
    }
    if isinstance(router, ModuleVectorRouter):
        metrics["num_modules"] = float(len(router.modules))
        metrics["zero_vector_experts"] = float(len(router.zero_vector_experts()))
        for name, value in router.vector_similarity().items():
            metrics[f"vector_{name}"] = value
        return metrics
    routes_embeddings = isinstance(router, (GaussianRouter, CentroidRouter))
    if routes_embeddings and metric_samples > 0 and all(e.statistics for e in experts):
        metrics.update(_sample_metrics(router, experts, metric_samples))
    metrics.update(getattr(router, "federation_metrics", {}))  # federated: rounds, failures
    return metrics


@torch.no_grad()
def _sample_metrics(
    router: Router, experts: Sequence[ExpertRecord], num_samples: int
) -> dict[str, float]:
    bank = GaussianBank.from_experts(experts)
    generator = torch.Generator().manual_seed(METRIC_SEED)
    x, y = bank.draw_labelled(num_samples, bank.prior_probs("counts"), generator)
    logits: torch.Tensor | None = None
    if isinstance(router, GaussianRouter):
        x = router.prepare_samples(x)
        logits = router.logits(x)  # scored once, reused for the decision and the posteriors
        decision = top_k_softmax(logits, router._resolve_top_k(None), router.temperature)
    else:
        decision = router.route_examples(x)
    hits = decision.indices == y[:, None]
    metrics = {
        "sample_accuracy": float(hits[:, 0].float().mean()),
        "sample_top_k_recall": float(hits.any(dim=1).float().mean()),
        "sample_mean_top_weight": float(decision.weights[:, 0].mean()),
    }
    if isinstance(router, GaussianRouter) and logits is not None:
        posteriors = torch.softmax(logits / router.temperature, dim=-1)
        picked = posteriors.gather(1, y[:, None]).squeeze(1)
        metrics["sample_nll"] = float(-picked.clamp_min(1e-12).log().mean())
        metrics["sample_ece"] = expected_calibration_error(posteriors, y)
        metrics["temperature"] = float(router.temperature)
    return metrics
