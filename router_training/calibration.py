"""Temperature scaling and calibration metrics for routers whose weights are posteriors.

Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks") divides the
logits ``z`` [n, E] by one scalar ``T`` fitted by minimising the negative log-likelihood of
held-out labels ``y`` [n]. The targets are smoothed by a small ``epsilon`` (``q_i = (1 - epsilon)
onehot(y_i) + epsilon / E``): without it, samples that the router separates perfectly drive
``T -> 0`` and the first misrouted input would get weight ~1 on a wrong expert; with it, the
top weight of a confidently routed input saturates near ``1 - epsilon``::

    NLL(beta) = mean_i( logsumexp_e(beta * z_ie) - beta * <q_i, z_i> ),   beta = 1 / T

``NLL`` is convex in ``beta`` (a log-sum-exp of functions linear in ``beta``), with

    NLL'(beta)  = mean_i( E_{p_i}[z_i] - <q_i, z_i> )
    NLL''(beta) = mean_i( Var_{p_i}[z_i] ) >= 0,        p_i = softmax(beta * z_i)

so a safeguarded Newton iteration on a bracket finds the optimum in a handful of steps (each one
softmax over ``[n, E]``). Routers here fit ``T`` on labelled samples drawn from the experts'
uploaded Gaussians, never on raw data.
"""

from __future__ import annotations

import math

import torch

#: Bounds on the fitted temperature: below 0.01 weights are one-hot for any practical purpose,
#: above 100 they are uniform; when separable samples push the optimum to 0 we stop at the bound.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 1e2


#: Default target smoothing of :func:`fit_temperature`.
LABEL_SMOOTHING = 1e-3


def _derivatives(
    logits: torch.Tensor, logits_sq: torch.Tensor, target_logit: torch.Tensor, beta: float
) -> tuple[float, float]:
    """``(NLL'(beta), NLL''(beta))``; ``target_logit`` [n] is ``<q_i, z_i>``."""
    probs = torch.softmax(logits * beta, dim=-1)
    mean_z = torch.linalg.vecdot(probs, logits)
    var_z = torch.linalg.vecdot(probs, logits_sq) - mean_z.square()
    return float((mean_z - target_logit).mean()), float(var_z.clamp_min(0).mean())


def fit_temperature(
    logits: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = LABEL_SMOOTHING,
    max_iter: int = 60,
    rtol: float = 1e-4,
) -> float:
    """Temperature ``T`` minimising the (smoothed) NLL of ``targets`` under ``softmax(z / T)``.

    ``logits`` [n, E], ``targets`` [n]. Safeguarded Newton on ``beta = 1 / T`` inside the
    bracket ``[1 / MAX_TEMPERATURE, 1 / MIN_TEMPERATURE]``, stopping when a step changes
    ``beta`` by less than ``rtol`` (relative); typically 4-6 evaluations of the softmax.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError("fit_temperature needs logits [n, E] and targets [n]")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    logits = logits.detach().to(torch.float32)
    # Rows are shift-invariant; centring keeps the softmax well-scaled for large beta.
    logits = logits - logits.max(dim=-1, keepdim=True).values
    logits_sq = logits.square()
    picked = logits.gather(1, targets.detach().long()[:, None]).squeeze(1)
    target_logit = (1 - label_smoothing) * picked + label_smoothing * logits.mean(dim=-1)
    lo, hi = 1.0 / MAX_TEMPERATURE, 1.0 / MIN_TEMPERATURE
    beta = 1.0
    for _ in range(max_iter):
        grad, hess = _derivatives(logits, logits_sq, target_logit, beta)
        if grad > 0:
            hi = beta
        else:
            lo = beta
        step = beta - grad / hess if hess > 0 else math.nan
        # Newton inside the bracket, geometric bisection otherwise (NLL is convex in beta).
        new_beta = step if lo < step < hi else math.sqrt(lo * hi)
        converged = abs(new_beta - beta) <= rtol * beta
        beta = new_beta
        if converged:
            break
    return float(min(max(1.0 / beta, MIN_TEMPERATURE), MAX_TEMPERATURE))


def expected_calibration_error(
    probs: torch.Tensor, targets: torch.Tensor, num_bins: int = 15
) -> float:
    """Top-1 expected calibration error of ``probs`` [n, E] against ``targets`` [n]."""
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == targets).to(probs.dtype)
    edges = torch.linspace(0, 1, num_bins + 1, dtype=probs.dtype)
    bins = torch.bucketize(confidence, edges[1:-1])
    conf_sum = torch.zeros(num_bins, dtype=probs.dtype).index_add_(0, bins, confidence)
    acc_sum = torch.zeros(num_bins, dtype=probs.dtype).index_add_(0, bins, correct)
    return float((conf_sum - acc_sum).abs().sum() / max(len(targets), 1))
