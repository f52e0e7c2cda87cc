"""A linear softmax router over experts, initialised from LDA and refined by federated rounds.

The statistics routers (:mod:`moerge.router_training.lda`) only see what contributors upload: a
count, a mean and a low-rank-plus-diagonal covariance per expert. Federated averaging (McMahan et
al., 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data") lets the
router also learn from the contributors' *embeddings*, which never leave them: each contributor
takes a few local SGD steps on its own embeddings, labelled with its own expert id(s), and sends
back only the router's weights and its example count (see :mod:`.flower_client`).

The router is a linear classifier on whitened embeddings::

    logit_e(x) = ((x - c) @ P) @ V[:, e] + b_e        V [H, E], b [E], c [H], P [H, H]
    p(e | x)   = softmax_e(logit_e(x) / T)

Round 0 *is* the LDA router: with LDA's discriminant ``W`` [H, E], bias ``b`` (which includes
``log pi_e``) and centre ``c``, we set ``V = P^{-1} W``, so the logits equal LDA's, and the
temperature ``T`` is LDA's. ``P`` is a fixed preconditioner from the statistics, never trained:
``P = Sigma^{-1/2}`` for the pooled within-expert covariance ``Sigma`` shrunk by
``whitening_shrinkage`` (``whiten=True``), else ``diag(1/s)`` with ``s`` the per-dimension standard
deviation of the experts' prior mixture. Gradient descent on the raw discriminant is
ill-conditioned exactly where LDA's ``Sigma^{-1}`` is large (a few high-variance shared
directions); in whitened coordinates every direction learns at the same rate (on the test
federation, H = 32: within 1 point of LDA in 30 rounds from a nearest-mean start, against 2.5
points with per-dimension scaling). At H = 384 from a nearest-mean start the rounds approach,
but do not reach, LDA's accuracy: on Gaussian data the pooled-data optimum of this
unregularised classifier is below LDA (``benchmarks/results/federated_rounds.md``).

Why this aggregates correctly although every contributor holds a single class: with plain SGD and
one local step, the example-weighted FedAvg of ``theta - lr * grad_i`` is exactly one step of
``theta - lr * grad`` on the union of the contributors' data (the global cross-entropy), so the
federation trains the same classifier a central server would have trained on the pooled
embeddings. Several local steps drift towards each client's own expert (client drift; Karimireddy
et al., 2020, "SCAFFOLD"); keep ``local_steps`` small or use ``proximal_mu`` (FedProx).

``fit`` (used by :func:`~moerge.router_training.fitting.fit_router` and the coordinator) fits the
LDA and, for ``rounds > 0``, runs simulated rounds in which each expert's contributor is simulated
by draws from its uploaded Gaussian (:func:`simulated_contributors`), through
:func:`~moerge.router_training.federated_rounds.run_federated_rounds`; real rounds with real
contributors run on a Flower SuperLink (:mod:`~moerge.router_training.superlink`). The router
sits at the top of the federated wing: the rounds and the Flower apps train any
:class:`~moerge.router_training.federated_base.RoundsRouter` and never import this module (see
:mod:`~moerge.router_training.federated_base`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from moerge.router_training.base import ExpertRecord, Router, RouterConfig
from moerge.router_training.calibration import fit_temperature
from moerge.router_training.federated_base import (
    FEDERATED_ARRAYS,
    FROZEN_ARRAYS,
    ContributorData,
    FederatedRouterConfig,
)
from moerge.router_training.gaussian import GaussianBank, GaussianRouter, as_float_batch
from moerge.router_training.lda import LDARouter, LDARouterConfig, pooled_covariance_solve
from moerge.router_training.methods import register_router


@register_router
class FederatedRouter(GaussianRouter):
    """Linear softmax router over experts whose weights are trained by federated averaging."""

    method: ClassVar[str] = "federated"
    config_class: ClassVar[type[RouterConfig]] = FederatedRouterConfig
    config: FederatedRouterConfig

    weight: torch.Tensor  # V [H, E] (whitened coordinates)
    bias: torch.Tensor  # b [E]
    center: torch.Tensor  # c [H]
    whitener: torch.Tensor  # P [H, H], symmetric

    @classmethod
    def fit(cls, experts: Sequence[ExpertRecord], config: RouterConfig) -> FederatedRouter:
        """LDA initialisation, then ``config.rounds`` simulated rounds (contributors simulated
        from their uploaded Gaussians; no raw data exists at the coordinator)."""
        router = super().fit(experts, config)
        assert isinstance(router, FederatedRouter)
        if router.config.rounds == 0:
            return router
        if router.config.backend == "superlink":
            raise ValueError(
                "backend 'superlink' runs at a coordinator with a Flower SuperLink (config "
                "'superlink'); see moerge.router_training.superlink.fit_on_superlink"
            )
        # Imported on first use: Flower adds a quarter of a second to importing the package.
        from moerge.router_training.federated_rounds import run_federated_rounds

        bank = GaussianBank.from_experts(experts, router.config.variance_floor)
        contributors = simulated_contributors(
            bank, router.expert_ids, router.config.simulated_examples, router.config.seed + 1
        )
        outcome = run_federated_rounds(router, contributors, router.config.rounds)
        trained = outcome.router
        trained.recalibrate(bank)
        trained.federation_metrics = outcome.summary()
        return trained

    def recalibrate(self, bank: GaussianBank) -> None:
        """Refit the temperature after rounds, on draws from the uploaded statistics."""
        if self.config.calibrate:
            generator = torch.Generator().manual_seed(self.config.seed + 2)
            probs = bank.prior_probs(self.config.priors)
            x, y = bank.draw_labelled(self.config.calibration_samples, probs, generator)
            self.temperature = fit_temperature(self.logits(x), y)

    def __init__(self, config: FederatedRouterConfig, expert_ids: Sequence[str]) -> None:
        super().__init__(config, expert_ids)
        #: per-run summary of the last federation (rounds, participants, failures), if any
        self.federation_metrics: dict[str, float] = {}

    def _fit_bank(self, bank: GaussianBank, generator: torch.Generator) -> None:
        lda = LDARouter(
            LDARouterConfig(
                top_k=self.config.top_k,
                priors=self.config.priors,
                calibrate=False,
                variance_floor=self.config.variance_floor,
                seed=self.config.seed,
                shrinkage=self.config.shrinkage,
            ),
            self.expert_ids,
        )
        lda.log_priors = self.log_priors
        lda._fit_bank(bank, generator)
        whitener, unwhitener = self._whitener(bank)
        self.center = lda.scorer.center
        self.whitener = whitener.to(torch.float32).contiguous()
        self.set_arrays(
            {"weight": unwhitener @ lda.scorer.weight.to(torch.float64), "bias": lda.scorer.bias}
        )

    def _whitener(self, bank: GaussianBank) -> tuple[torch.Tensor, torch.Tensor]:
        """``P`` and ``P^{-1}`` (float64), see the module docstring."""
        if not self.config.whiten:
            _, variance = bank.mixture_moments(self.log_priors.to(torch.float64).exp())
            std = variance.to(torch.float64).sqrt().clamp_min(1e-6)
            return torch.diag(1.0 / std), torch.diag(std)
        eye = torch.eye(bank.hidden_size, dtype=torch.float64)
        precision = pooled_covariance_solve(bank, eye, self.config.whitening_shrinkage, "dense")
        values, vectors = torch.linalg.eigh((precision + precision.T) / 2)
        values = values.clamp_min(values.max() * 1e-12)
        return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits of the federated linear head over centred (and, if trained so, whitened)
        embeddings."""
        x = as_float_batch(embeddings, int(self.weight.shape[0]))
        return torch.addmm(self.bias, x - self.center, self._routing_weight)

    # -- what a federated round exchanges -----------------------------------------------------
    def arrays(self) -> dict[str, torch.Tensor]:
        """The tensors a round trains and averages (:data:`FEDERATED_ARRAYS`)."""
        return {name: getattr(self, name) for name in FEDERATED_ARRAYS}

    def frozen_arrays(self) -> dict[str, torch.Tensor]:
        """The fixed tensors a round sends along (:data:`FROZEN_ARRAYS`)."""
        return {name: getattr(self, name) for name in FROZEN_ARRAYS}

    def set_arrays(self, arrays: dict[str, torch.Tensor]) -> None:
        """Replace the trained tensors (``weight``, ``bias``) and refold the routing weight."""
        missing = sorted(set(FEDERATED_ARRAYS) - set(arrays))
        if missing:
            raise ValueError(f"federated router arrays missing {missing}")
        for name in FEDERATED_ARRAYS:
            setattr(self, name, arrays[name].detach().to(torch.float32).contiguous())
        # Routing folds the whitener in once: (x - c) @ (P V) + b.
        self._routing_weight = (
            (self.whitener.to(torch.float64) @ self.weight.to(torch.float64))
            .to(torch.float32)
            .contiguous()
        )

    def copy(self) -> FederatedRouter:
        """An independent router with the same config, experts and tensors."""
        clone = FederatedRouter(self.config, self.expert_ids)
        clone.load_state_dict({k: v.clone() for k, v in self.state_dict().items()})
        return clone

    # -- serialisation ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The base LDA state, the frozen arrays and the arrays the rounds trained."""
        return {**self._base_state(), **self.frozen_arrays(), **self.arrays()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""
        self._load_base_state(state)
        for name in FROZEN_ARRAYS:
            setattr(self, name, state[name].to(torch.float32).contiguous())
        self.set_arrays(state)


def simulated_contributors(
    bank: GaussianBank, expert_ids: Sequence[str], per_expert: int, seed: int
) -> list[ContributorData]:
    """One contributor per expert, holding draws from that expert's Gaussian.

    Sizes follow the experts' example counts, as real contributors' would (the priors are
    learned from them): ``E * per_expert`` draws in all, split by count, at least 8 each.
    """
    generator = torch.Generator().manual_seed(seed)
    probs = bank.counts / bank.counts.sum()
    sizes = (probs * bank.num_experts * per_expert).round().long().clamp_min(8)
    labels = torch.repeat_interleave(torch.arange(bank.num_experts), sizes)
    x = bank.sample(labels, generator)
    # Each contributor owns its rows (a view would carry, and serialise, everyone's storage).
    parts = [part.clone() for part in torch.split(x, sizes.tolist())]
    return [ContributorData.single_expert(p, e) for p, e in zip(parts, expert_ids, strict=True)]


def as_federated(router: Router) -> FederatedRouter:
    """``router`` itself if federated; else ``ValueError`` (federation trains only this class)."""
    if not isinstance(router, FederatedRouter):
        raise ValueError(f"federated rounds need a 'federated' router, got '{router.method}'")
    return router
