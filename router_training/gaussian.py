"""What the statistics routers share: the experts' Gaussians, priors, sampling, calibration.

Each contributor uploads, for the mean-pooled L2-normalised base-model embeddings ``x`` [H] of
its data (see :mod:`moerge.expert_format`), the count ``n_e``, the mean ``mu_e`` [H] and a
covariance in diagonal-plus-low-rank form::

    Sigma_e ~= U_e U_e^T + diag(D_e),        U_e [H, k_e],  D_e [H]

A statistics router treats expert ``e`` as the class-conditional ``N(mu_e, Sigma_e)`` and routes
with the class posterior (Bayes' rule)::

    p(e | x) = softmax_e( log N(x; mu_e, Sigma_e) + log pi_e )

with priors ``pi_e = n_e / sum_j n_j`` (``priors="counts"``) or ``1 / E`` (``"uniform"``). The
routing weights are this posterior restricted to the top-k experts and renormalised, which is
``softmax(topk(logits) / T)`` (:func:`~moerge.router_training.base.top_k_softmax`).

**Calibration.** Gaussian posteriors are only as calibrated as the Gaussian model (LDA's shared
covariance is misspecified whenever the experts' covariances differ; an MLP is calibrated by
nothing). With ``calibrate=True`` a single temperature ``T`` is fitted by minimising the NLL of
labelled samples drawn from the experts' Gaussians (the prior mixture ``sum_e pi_e N(mu_e,
Sigma_e)``, independent of anything used to fit the router;
:func:`~moerge.router_training.calibration.fit_temperature`); otherwise ``T = 1`` and the
weights are the model's own posteriors.

**Sampling.** ``x = mu_e + U_e z + sqrt(D_e) * eps`` with ``z ~ N(0, I_k)``, ``eps ~ N(0, I_H)``,
drawn from a seeded ``torch.Generator`` so every fit is reproducible.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from moerge.router_training.base import (
    ExpertRecord,
    Granularity,
    Needs,
    Router,
    RouterConfig,
    RoutingDecision,
    top_k_softmax,
)
from moerge.router_training.calibration import fit_temperature

PRIOR_CHOICES = ("counts", "uniform")
#: Floor on each ``D_e`` as a fraction of the expert's mean variance ``tr(Sigma_e) / H``.
DEFAULT_VARIANCE_FLOOR = 1e-3


@dataclass
class GaussianBank:
    """The experts' Gaussians, stacked. ``E`` experts, hidden size ``H``, max rank ``k``.

    Shapes: ``means`` [E, H], ``cov_diag`` [E, H] (floored, see :meth:`from_experts`),
    ``cov_factor`` [E, H, k] (experts of lower rank are zero-padded, which leaves
    ``U U^T`` unchanged), ``counts`` [E] (float64).
    """

    means: torch.Tensor
    cov_diag: torch.Tensor
    cov_factor: torch.Tensor
    counts: torch.Tensor

    @property
    def num_experts(self) -> int:
        """Experts in the bank (E)."""
        return int(self.means.shape[0])

    @property
    def hidden_size(self) -> int:
        """Embedding width (H)."""
        return int(self.means.shape[1])

    @property
    def rank(self) -> int:
        """Rank of each expert's low-rank covariance factor."""
        return int(self.cov_factor.shape[2])

    @classmethod
    def from_experts(
        cls, experts: Sequence[ExpertRecord], variance_floor: float = DEFAULT_VARIANCE_FLOOR
    ) -> GaussianBank:
        """Stack the experts' statistics; ``ValueError`` naming experts without usable ones.

        Each ``D_e`` is floored at ``variance_floor * tr(Sigma_e) / H`` (and at 1e-12): a
        diagonal far below the expert's mean variance (a lossless ``k = H`` upload, or DP noise
        clipped at zero) makes ``Sigma_e`` ill-conditioned, and the float32 Woodbury expansions
        that make QDA routing fast would then cancel catastrophically.
        """
        if not experts:
            raise ValueError("need at least one expert")
        missing = [e.expert_id for e in experts if e.statistics is None]
        if missing:
            raise ValueError(f"experts without statistics: {missing[:10]}")
        stats = [e.statistics for e in experts if e.statistics is not None]
        hidden = int(stats[0].mean.shape[-1])
        for expert, s in zip(experts, stats, strict=True):
            shapes_ok = (
                tuple(s.mean.shape) == (hidden,)
                and tuple(s.cov_diag.shape) == (hidden,)
                and s.cov_factor.ndim == 2
                and s.cov_factor.shape[0] == hidden
            )
            if not shapes_ok:
                raise ValueError(
                    f"expert {expert.expert_id!r}: statistics shapes mean {tuple(s.mean.shape)}, "
                    f"cov_diag {tuple(s.cov_diag.shape)}, cov_factor {tuple(s.cov_factor.shape)} "
                    f"do not fit hidden size {hidden}"
                )
            if s.example_count < 1:
                raise ValueError(f"expert {expert.expert_id!r}: example_count must be >= 1")
        rank = max(int(s.cov_factor.shape[1]) for s in stats)
        num = len(stats)
        means = torch.stack([s.mean.to(torch.float32) for s in stats])
        cov_diag = torch.stack([s.cov_diag.to(torch.float32) for s in stats])
        cov_factor = torch.zeros(num, hidden, rank)
        for i, s in enumerate(stats):
            cov_factor[i, :, : s.cov_factor.shape[1]] = s.cov_factor.to(torch.float32)
        if not (
            torch.isfinite(means).all()
            and torch.isfinite(cov_diag).all()
            and torch.isfinite(cov_factor).all()
        ):
            raise ValueError("statistics contain NaN or infinite values")
        mean_variance = (cov_diag.clamp_min(0).sum(-1) + cov_factor.square().sum((1, 2))) / hidden
        floor = (variance_floor * mean_variance).clamp_min(1e-12)[:, None]
        cov_diag = torch.maximum(cov_diag, floor)
        counts = torch.tensor([float(s.example_count) for s in stats], dtype=torch.float64)
        return cls(means=means, cov_diag=cov_diag, cov_factor=cov_factor, counts=counts)

    def prior_probs(self, priors: str) -> torch.Tensor:
        """``pi`` [E] (float64) for ``priors`` in :data:`PRIOR_CHOICES`."""
        if priors == "counts":
            return self.counts / self.counts.sum()
        if priors == "uniform":
            return torch.full((self.num_experts,), 1.0 / self.num_experts, dtype=torch.float64)
        raise ValueError(f"priors must be one of {PRIOR_CHOICES}, got {priors!r}")

    def sample(
        self, expert_index: torch.Tensor, generator: torch.Generator, chunk: int = 1024
    ) -> torch.Tensor:
        """One draw from ``N(mu_e, Sigma_e)`` per entry of ``expert_index`` [n] -> [n, H]."""
        out = torch.empty(len(expert_index), self.hidden_size)
        for start in range(0, len(expert_index), chunk):
            idx = expert_index[start : start + chunk]
            n = len(idx)
            eps = torch.randn(n, self.hidden_size, generator=generator)
            x = self.means[idx] + eps * self.cov_diag[idx].sqrt()
            if self.rank:
                z = torch.randn(n, self.rank, 1, generator=generator)
                x += torch.bmm(self.cov_factor[idx], z).squeeze(-1)
            out[start : start + n] = x
        return out

    def sample_grouped(
        self, experts: torch.Tensor, per_expert: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_expert`` draws from each of ``experts`` [m]: ``x`` [m * per_expert, H], labels.

        Cheaper than :meth:`sample` for the same number of draws: each expert's factor is
        gathered once for its group instead of once per draw.
        """
        m = len(experts)
        eps = torch.randn(m, per_expert, self.hidden_size, generator=generator)
        x = self.means[experts][:, None, :] + eps * self.cov_diag[experts].sqrt()[:, None, :]
        if self.rank:
            z = torch.randn(m, self.rank, per_expert, generator=generator)
            x += torch.bmm(self.cov_factor[experts], z).transpose(1, 2)
        return x.reshape(m * per_expert, self.hidden_size), experts.repeat_interleave(per_expert)

    def draw_labelled(
        self, num_samples: int, probs: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_samples`` labelled draws from the mixture ``sum_e probs_e N(mu_e, Sigma_e)``.

        Returns ``x`` [n, H] and the source expert ``y`` [n] (long).
        """
        labels = torch.multinomial(
            probs.to(torch.float32), num_samples, replacement=True, generator=generator
        )
        return self.sample(labels, generator), labels

    def mixture_moments(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [H] and per-dimension variance [H] of the mixture with weights ``probs`` [E]."""
        w = probs.to(torch.float64)[:, None]
        means = self.means.to(torch.float64)
        factor_sq = self.cov_factor.to(torch.float64).square().sum(-1)
        second = self.cov_diag.to(torch.float64) + factor_sq  # E[(x_h - mu_h)^2 | e]
        mean = (w * means).sum(0)
        var = (w * (second + means.square())).sum(0) - mean.square()
        return mean.to(torch.float32), var.clamp_min(0).to(torch.float32)


@dataclass
class GaussianRouterConfig(RouterConfig):
    """Fields shared by the statistics routers (``lda``, ``qda``, ``mlp``)."""

    priors: str = "counts"  # "counts": pi_e proportional to example_count; "uniform": 1/E
    calibrate: bool = True  # fit a softmax temperature on samples drawn from the Gaussians
    calibration_samples: int = 2048  # labelled draws from the prior mixture for that fit
    variance_floor: float = DEFAULT_VARIANCE_FLOOR  # floor on D_e, relative to tr(Sigma_e) / H
    seed: int = 0  # seeds every draw made while fitting

    def validate(self) -> None:
        """Refuse out-of-range settings with a ``ValueError`` naming the field (configs come from
        JSON and the CLI)."""
        super().validate()
        if self.priors not in PRIOR_CHOICES:
            raise ValueError(f"priors must be one of {PRIOR_CHOICES}, got {self.priors!r}")
        if not isinstance(self.calibrate, bool):
            raise ValueError(f"calibrate must be a bool, got {self.calibrate!r}")
        if not isinstance(self.calibration_samples, int) or self.calibration_samples < 16:
            raise ValueError(
                f"calibration_samples must be an integer >= 16, got {self.calibration_samples!r}"
            )
        if not isinstance(self.variance_floor, (int, float)) or not 0 < self.variance_floor < 1:
            raise ValueError(f"variance_floor must be in (0, 1), got {self.variance_floor!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


class GaussianRouter(Router):
    """Example-level router whose logits are (unnormalised) log posteriors over experts.

    Subclasses implement :meth:`_fit_bank` (precompute every tensor routing needs) and
    :meth:`logits` (``[B, H] -> [B, E]``, log joint ``log p(x|e) + log pi_e`` up to a per-row
    constant). This class handles priors, the calibration temperature and top-k selection.
    """

    needs: ClassVar[Needs] = "statistics"

    granularity: ClassVar[Granularity] = "example"
    config_class: ClassVar[type[RouterConfig]] = GaussianRouterConfig
    config: GaussianRouterConfig

    def __init__(self, config: GaussianRouterConfig, expert_ids: Sequence[str]) -> None:
        super().__init__(config, expert_ids)
        self.temperature = 1.0
        self.log_priors = torch.zeros(self.num_experts)

    @classmethod
    def fit(cls, experts: Sequence[ExpertRecord], config: RouterConfig) -> GaussianRouter:
        """Fit the class-conditional Gaussian scorer from the experts' statistics (means, low-rank
        covariances) and priors; calibrate the temperature on drawn samples when asked."""
        router = cls(config, [e.expert_id for e in experts])  # type: ignore[arg-type]
        bank = GaussianBank.from_experts(experts, router.config.variance_floor)
        generator = torch.Generator().manual_seed(router.config.seed)
        probs = bank.prior_probs(router.config.priors)
        router.log_priors = probs.log().to(torch.float32)
        router._fit_bank(bank, generator)
        if router.config.calibrate:
            x, y = bank.draw_labelled(router.config.calibration_samples, probs, generator)
            router.temperature = fit_temperature(router.logits(router.prepare_samples(x)), y)
        return router

    def prepare_samples(self, samples: torch.Tensor) -> torch.Tensor:
        """Map draws from the Gaussians to what this router is fitted for (identity here)."""
        return samples

    @abstractmethod
    def _fit_bank(self, bank: GaussianBank, generator: torch.Generator) -> None:
        """Precompute, from the stacked statistics, every tensor :meth:`logits` needs."""

    @abstractmethod
    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Uncalibrated log posteriors (up to a per-row constant): ``[B, H] -> [B, E]``."""

    def posteriors(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Calibrated posterior over every expert: ``[B, H] -> [B, E]``."""
        return torch.softmax(self.logits(embeddings) / self.temperature, dim=-1)

    def route_examples(self, embeddings: torch.Tensor, top_k: int | None = None) -> RoutingDecision:
        """Softmax over the top-k Gaussian log-likelihoods plus log-priors, at the fitted
        temperature."""
        k = self._resolve_top_k(top_k)
        return top_k_softmax(self.logits(embeddings), k, self.temperature)

    def _base_state(self) -> dict[str, torch.Tensor]:
        return {
            "log_priors": self.log_priors,
            "temperature": torch.tensor([self.temperature], dtype=torch.float64),
        }

    def _load_base_state(self, state: dict[str, torch.Tensor]) -> None:
        self.log_priors = state["log_priors"]
        self.temperature = float(state["temperature"][0])


def as_float_batch(embeddings: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """Check ``embeddings`` is ``[B, hidden_size]`` and return it as float32."""
    if embeddings.ndim != 2 or embeddings.shape[1] != hidden_size:
        raise ValueError(
            f"expected embeddings of shape [B, {hidden_size}], got {tuple(embeddings.shape)}"
        )
    return embeddings.to(torch.float32)
