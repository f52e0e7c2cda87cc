"""Quadratic discriminant analysis over experts, fitted from the uploaded statistics alone.

QDA (Hastie, Tibshirani & Friedman, "The Elements of Statistical Learning", 2009, Sec. 4.3):
each expert keeps its own Gaussian ``N(mu_e, Sigma_e)`` with the uploaded covariance
``Sigma_e = diag(D_e) + U_e U_e^T`` (``U_e`` [H, k]). The log joint of expert ``e`` is::

    logit_e(x) = -1/2 log det Sigma_e - 1/2 (x - mu_e)^T Sigma_e^{-1} (x - mu_e) + log pi_e

computed without ever forming an ``H x H`` matrix, with the capacitance
``C_e = I_k + U_e^T D_e^{-1} U_e = L_e L_e^T`` (Cholesky, ``k x k``):

* matrix determinant lemma::

      log det Sigma_e = sum_h log D_eh + log det C_e = sum_h log D_eh + 2 sum_i log (L_e)_ii

* Woodbury identity, with ``V_e = D_e^{-1} U_e L_e^{-T}`` [H, k]::

      Sigma_e^{-1} = D_e^{-1} - V_e V_e^T
      (x - mu_e)^T Sigma_e^{-1} (x - mu_e) = sum_h r_h^2 / D_eh - || V_e^T r ||^2,  r = x - mu_e

Fitting costs ``O(E H k^2 + E k^3)``. Routing a batch ``x`` [B, H] expands the squares into
matrix products over all experts at once (``c`` is a common centre, ``y = x - c``,
``m_e = mu_e - c``)::

    sum_h r_h^2 / D_eh = [y^2, y] @ [D_e^{-1}; -2 m_e / D_e] + sum_h m_eh^2 / D_eh
    V_e^T r            = V_e^T y - V_e^T m_e

which costs ``O(B E H (k + 2))`` -- the irreducible price of per-expert covariances. Weights are
the calibrated posterior restricted to the top-k and renormalised
(see :mod:`moerge.router_training.gaussian`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from moerge.router_training.base import RouterConfig
from moerge.router_training.gaussian import (
    GaussianBank,
    GaussianRouter,
    GaussianRouterConfig,
    as_float_batch,
)
from moerge.router_training.methods import register_router

#: Rows of a batch scored together are capped so that ``rows * E * k`` stays below this.
_MAX_LOWRANK_ELEMENTS = 1 << 23


@dataclass
class QDARouterConfig(GaussianRouterConfig):
    """QDA over experts; see the module docstring for the equations (no extra fields)."""


@register_router
class QDARouter(GaussianRouter):
    """Per-expert diagonal-plus-low-rank Gaussian classifier over experts (example-level).

    Fitted tensors: ``center`` [H]; ``diag_weight`` [E, 2H] = ``[D^{-1}, -2 m / D]``;
    ``lowrank`` [E, k, H] = ``V_e^T``; ``lowrank_mean`` [E, k] = ``V_e^T m_e``; ``bias`` [E] =
    ``-1/2 (log det Sigma_e + sum m^2 / D) + log pi_e``.
    """

    method: ClassVar[str] = "qda"
    config_class: ClassVar[type[RouterConfig]] = QDARouterConfig
    config: QDARouterConfig

    center: torch.Tensor
    diag_weight: torch.Tensor
    lowrank: torch.Tensor
    lowrank_mean: torch.Tensor
    bias: torch.Tensor

    def _fit_bank(self, bank: GaussianBank, generator: torch.Generator) -> None:
        probs = self.log_priors.to(torch.float64).exp()
        center = (probs[:, None] * bank.means.to(torch.float64)).sum(0).to(torch.float32)
        m = bank.means - center  # [E, H]
        d_inv = 1.0 / bank.cov_diag  # [E, H]
        u = bank.cov_factor  # [E, H, k]
        num, rank = bank.num_experts, bank.rank
        d_inv_u = d_inv[:, :, None] * u  # [E, H, k]
        capacitance = torch.eye(rank, dtype=torch.float64) + torch.bmm(
            u.transpose(1, 2), d_inv_u
        ).to(torch.float64)  # [E, k, k]
        chol = torch.linalg.cholesky(capacitance)
        logdet = bank.cov_diag.to(torch.float64).log().sum(-1) + 2 * chol.diagonal(
            dim1=-2, dim2=-1
        ).log().sum(-1)
        # V_e^T = L_e^{-1} U_e^T D_e^{-1}   [E, k, H]
        lowrank = torch.linalg.solve_triangular(
            chol.to(torch.float32), d_inv_u.transpose(1, 2), upper=False
        )
        self.center = center
        self.diag_weight = torch.cat([d_inv, -2.0 * m * d_inv], dim=1).contiguous()
        self.lowrank = lowrank.contiguous() if rank else torch.zeros(num, 0, bank.hidden_size)
        self.lowrank_mean = torch.einsum("ekh,eh->ek", self.lowrank, m)
        const = (m.to(torch.float64).square() * d_inv.to(torch.float64)).sum(-1)
        self.bias = (-0.5 * (logdet + const) + self.log_priors.to(torch.float64)).to(torch.float32)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Quadratic discriminant scores [N, E], in row blocks so the low-rank terms stay within a
        memory bound."""
        x = as_float_batch(embeddings, self.center.shape[0]) - self.center
        num, rank, hidden = self.lowrank.shape
        rows = max(1, _MAX_LOWRANK_ELEMENTS // max(num * rank, 1))
        flat_lowrank = self.lowrank.reshape(num * rank, hidden)
        out = torch.empty(x.shape[0], num)
        for start in range(0, x.shape[0], rows):
            y = x[start : start + rows]
            diag = F.linear(torch.cat([y.square(), y], dim=1), self.diag_weight)  # [b, E]
            if rank:
                proj = F.linear(y, flat_lowrank).view(-1, num, rank) - self.lowrank_mean
                diag = diag - proj.square().sum(-1)
            out[start : start + rows] = self.bias - 0.5 * diag
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The base state and QDA's centre, diagonal weights, low-rank factors and bias."""
        return {
            **self._base_state(),
            "center": self.center,
            "diag_weight": self.diag_weight,
            "lowrank": self.lowrank,
            "lowrank_mean": self.lowrank_mean,
            "bias": self.bias,
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""
        self._load_base_state(state)
        self.center = state["center"]
        self.diag_weight = state["diag_weight"]
        self.lowrank = state["lowrank"]
        self.lowrank_mean = state["lowrank_mean"]
        self.bias = state["bias"]
