"""Linear discriminant analysis over experts, fitted from the uploaded statistics alone.

Classic LDA (Fisher, 1936; Hastie, Tibshirani & Friedman, "The Elements of Statistical
Learning", 2009, Sec. 4.3) with every class-conditional Gaussian sharing one covariance. Here the
classes are experts and the shared covariance is the count-weighted average of the experts'
uploaded within-expert covariances, each in diagonal-plus-low-rank form::

    w_e      = n_e / sum_j n_j
    Sigma_w  = sum_e w_e (U_e U_e^T + diag(D_e)) = diag(D_bar) + F F^T
    D_bar    = sum_e w_e D_e                                   [H]
    F        = [sqrt(w_1) U_1, ..., sqrt(w_E) U_E]             [H, E k]

optionally shrunk towards a scaled identity (Ledoit & Wolf, 2004)::

    Sigma    = (1 - alpha) Sigma_w + alpha * tau * I,     tau = tr(Sigma_w) / H

The discriminant of expert ``e`` for an embedding ``x`` [H] is the log joint up to terms equal for
every expert (``c`` is any centre; we use the prior-weighted mean of the experts' means)::

    a_e      = Sigma^{-1} (mu_e - c)                           [H]
    logit_e  = (x - c)^T a_e - 1/2 (mu_e - c)^T a_e + log pi_e

``Sigma`` is inverted once, never per expert, by whichever solve is cheaper:

* ``solver="woodbury"`` (cheaper when ``E k < H``), with ``Delta = diag(d)`` the shrunk diagonal
  and ``G = sqrt(1 - alpha) F``::

      Sigma^{-1} Y = Delta^{-1} Y - Delta^{-1} G (I_{Ek} + G^T Delta^{-1} G)^{-1} G^T Delta^{-1} Y

  costing ``O(H (Ek)^2 + (Ek)^3 + H E k E)``;
* ``solver="dense"`` (cheaper when ``E k >= H``): form ``Sigma`` [H, H] in ``O(E H^2 k)`` (in
  chunks of experts, never holding ``F``) and solve by Cholesky in ``O(H^3 + H^2 E)``.

Routing is one ``[B, H] x [H, E]`` product plus a bias (:class:`~moerge.router_training.scoring.
LinearScorer`); everything else is precomputed at fit time. Weights are the calibrated posterior
restricted to the top-k and renormalised (see :mod:`moerge.router_training.gaussian`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from moerge.router_training.base import RouterConfig
from moerge.router_training.gaussian import (
    GaussianBank,
    GaussianRouter,
    GaussianRouterConfig,
    as_float_batch,
)
from moerge.router_training.methods import register_router
from moerge.router_training.scoring import LinearScorer, check_score_dtype

SOLVERS = ("auto", "woodbury", "dense")


@dataclass
class LDARouterConfig(GaussianRouterConfig):
    """LDA over experts; see the module docstring for the equations."""

    shrinkage: float = 0.0  # alpha in [0, 1]: weight of the scaled identity in Sigma
    solver: str = "auto"  # "woodbury", "dense", or "auto" (woodbury iff E*k < H)
    score_dtype: str = "float32"  # "float32" or "bfloat16" for the routing product

    def validate(self) -> None:
        """Refuse out-of-range settings with a ``ValueError`` naming the field (configs come from
        JSON and the CLI)."""
        super().validate()
        if not isinstance(self.shrinkage, (int, float)) or not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {self.shrinkage!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        check_score_dtype(self.score_dtype)


def pooled_covariance_solve(
    bank: GaussianBank, rhs: torch.Tensor, shrinkage: float, solver: str
) -> torch.Tensor:
    """``Sigma^{-1} rhs`` for the (shrunk) count-weighted within covariance; ``rhs`` [H, m]."""
    hidden, num, rank = bank.hidden_size, bank.num_experts, bank.rank
    w = (bank.counts / bank.counts.sum()).to(torch.float64)
    d = (w[:, None] * bank.cov_diag.to(torch.float64)).sum(0)  # [H]
    factor_sq_norm = (w * bank.cov_factor.to(torch.float64).square().sum((1, 2))).sum()
    if shrinkage:
        tau = (d.sum() + factor_sq_norm) / hidden
        d = (1.0 - shrinkage) * d + shrinkage * tau
    low_scale = (1.0 - shrinkage) ** 0.5
    rhs = rhs.to(torch.float64)
    if solver == "auto":
        solver = "woodbury" if num * rank < hidden else "dense"
    if solver == "woodbury":
        # G [H, E k]: the columns sqrt(w_e (1 - alpha)) U_e, expert-major.
        g = bank.cov_factor.to(torch.float64) * (w.sqrt() * low_scale)[:, None, None]
        g = g.permute(1, 0, 2).reshape(hidden, num * rank)
        d_inv_rhs = rhs / d[:, None]
        d_inv_g = g / d[:, None]
        capacitance = torch.eye(num * rank, dtype=torch.float64) + g.T @ d_inv_g
        chol = torch.linalg.cholesky(capacitance)
        inner = torch.cholesky_solve(g.T @ d_inv_rhs, chol)
        return d_inv_rhs - d_inv_g @ inner
    sigma = torch.diag(d)
    chunk = max(1, 4096 // max(rank, 1))
    for start in range(0, num, chunk):
        u = bank.cov_factor[start : start + chunk]  # [c, H, k]
        scaled = u * (w[start : start + chunk].sqrt() * low_scale).to(torch.float32)[:, None, None]
        flat = scaled.permute(1, 0, 2).reshape(hidden, -1)
        sigma += (flat @ flat.T).to(torch.float64)
    chol = torch.linalg.cholesky(sigma)
    return torch.cholesky_solve(rhs, chol)


@register_router
class LDARouter(GaussianRouter):
    """Shared-covariance Gaussian classifier over experts (example-level)."""

    method: ClassVar[str] = "lda"
    config_class: ClassVar[type[RouterConfig]] = LDARouterConfig
    config: LDARouterConfig

    scorer: LinearScorer

    def _fit_bank(self, bank: GaussianBank, generator: torch.Generator) -> None:
        probs = self.log_priors.to(torch.float64).exp()
        center = (probs[:, None] * bank.means.to(torch.float64)).sum(0)  # [H]
        offsets = (bank.means.to(torch.float64) - center).T  # [H, E]
        weight = pooled_covariance_solve(bank, offsets, self.config.shrinkage, self.config.solver)
        bias = -0.5 * (offsets * weight).sum(0) + self.log_priors.to(torch.float64)
        self.scorer = LinearScorer(weight, bias, center, self.config.score_dtype)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """LDA's linear discriminant scores of the embeddings [N, H] -> [N, E]."""
        return self.scorer(as_float_batch(embeddings, self.scorer.hidden_size))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The base state and the scorer's weight, bias and centre."""
        return {
            **self._base_state(),
            "weight": self.scorer.weight,
            "bias": self.scorer.bias,
            "center": self.scorer.center,
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`; the scorer is rebuilt in the config's score dtype."""
        self._load_base_state(state)
        self.scorer = LinearScorer(
            state["weight"], state["bias"], state["center"], self.config.score_dtype
        )
