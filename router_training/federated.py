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
by draws from its uploaded Gaussian (:func:`simulated_contributors`); real rounds with real
contributors run through :func:`~moerge.router_training.federation.run_federated_rounds`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from moerge.router_training.base import ExpertRecord, Router, RouterConfig
from moerge.router_training.calibration import fit_temperature
from moerge.router_training.gaussian import (
    GaussianBank,
    GaussianRouter,
    GaussianRouterConfig,
    as_float_batch,
)
from moerge.router_training.lda import LDARouter, LDARouterConfig, pooled_covariance_solve
from moerge.router_training.methods import register_router

#: Tensors contributors train and the strategy averages (the ``ArrayRecord`` of a round).
FEDERATED_ARRAYS = ("weight", "bias")
#: Fixed tensors contributors need to compute logits; sent in the round's ``ConfigRecord`` (as
#: safetensors bytes) so that DP clipping and noise apply to the trained tensors only.
FROZEN_ARRAYS = ("center", "whitener")
DP_CHOICES = ("none", "client", "server")
SERVER_OPTIMIZERS = ("sgd", "adam", "momentum")
BACKENDS = ("inprocess", "simulation", "superlink")


@dataclass
class FederatedRouterConfig(GaussianRouterConfig):
    """LDA initialisation plus FedAvg rounds; see the module docstring."""

    shrinkage: float = 0.0  # LDA shrinkage of the initial router (alpha in [0, 1])
    whiten: bool = True  # precondition by Sigma^{-1/2} (True) or the mixture's 1/std (False)
    whitening_shrinkage: float = 0.1  # shrinkage of the Sigma used for whitening, in [0, 1]
    rounds: int = 0  # federated rounds after the LDA initialisation (0: the LDA router itself)
    local_steps: int = 1  # SGD steps per contributor and round (1: exact large-batch SGD)
    local_batch_size: int = 64  # embeddings per local step (sampled from the contributor's own)
    learning_rate: float = 2.0  # local SGD learning rate on the whitened weights V
    proximal_mu: float = 0.0  # FedProx proximal term (0: FedAvg)
    fraction_train: float = 1.0  # fraction of connected contributors sampled per round
    min_train_nodes: int = 2  # a round needs at least this many sampled contributors
    dp: str = "none"  # "none", "client" (client clips) or "server" (server clips): central DP
    clipping_norm: float = 1.0  # L2 clip of each contributor's update (dp != "none")
    noise_multiplier: float = 0.0  # Gaussian noise std / clipping_norm on the aggregate
    dp_delta: float = 1e-5  # the delta at which the rounds' epsilon is reported (dp != "none")
    simulated_examples: int = 64  # draws per expert for the simulated contributors in ``fit``
    backend: str = "inprocess"  # "inprocess" (one process), "simulation" (Ray), "superlink"
    server_optimizer: str = "sgd"  # server step: "sgd" (FedAvg), "adam" (FedAdam), "momentum"
    server_learning_rate: float = 1.0  # its step size (FedAdam: eta, per element)
    server_adam_tau: float = 1e-3  # FedAdam's adaptivity (epsilon)
    server_momentum: float = 0.9  # FedAvgM's momentum
    secure_aggregation: bool = False  # SecAgg+ (Flower's legacy workflow): secure_aggregation.py
    secagg_num_shares: float = 1.0  # shares per mask: int > 2, or a fraction of sampled nodes
    secagg_reconstruction_threshold: float = 0.5  # shares to recover a mask (int or fraction)
    secagg_max_weight: float = 10_000.0  # largest example count; weights are count / max_weight
    secagg_clipping_range: float = 1.0  # |update * count / max_weight| is clipped to this
    secagg_quantization_range: int = 2**22  # quantisation levels over [-range, range]
    min_nodes: int = 2  # superlink: connected SuperNodes to wait for before round 1
    node_wait_seconds: float = 120.0  # superlink: how long to wait for them

    def validate(self) -> None:
        super().validate()
        LDARouterConfig(shrinkage=self.shrinkage).validate()
        LDARouterConfig(shrinkage=self.whitening_shrinkage).validate()
        if not isinstance(self.whiten, bool):
            raise ValueError(f"whiten must be a bool, got {self.whiten!r}")
        for name in ("rounds",):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in (
            "local_steps",
            "local_batch_size",
            "min_train_nodes",
            "simulated_examples",
            "min_nodes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in (
            "learning_rate",
            "clipping_norm",
            "node_wait_seconds",
            "server_learning_rate",
            "server_adam_tau",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        for name in ("proximal_mu", "noise_multiplier"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if not isinstance(self.fraction_train, (int, float)) or not 0 < self.fraction_train <= 1:
            raise ValueError(f"fraction_train must be in (0, 1], got {self.fraction_train!r}")
        if self.dp not in DP_CHOICES:
            raise ValueError(f"dp must be one of {DP_CHOICES}, got {self.dp!r}")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(f"server_optimizer must be one of {SERVER_OPTIMIZERS}")
        if self.dp != "none" and self.server_optimizer != "sgd":
            raise ValueError(
                "dp runs plain FedAvg (server_optimizer='sgd'): the noise is added after the "
                "server step, so momentum or Adam state would carry un-noised updates into later "
                "rounds"
            )
        if not isinstance(self.dp_delta, (int, float)) or not 0 < self.dp_delta < 1:
            raise ValueError(f"dp_delta must be in (0, 1), got {self.dp_delta!r}")
        if self.server_optimizer != "sgd" and self.secure_aggregation:
            raise ValueError("secure_aggregation runs plain FedAvg (server_optimizer='sgd')")
        if not isinstance(self.secure_aggregation, bool):
            raise ValueError(f"secure_aggregation must be a bool, got {self.secure_aggregation!r}")
        if self.secure_aggregation and self.dp != "none":
            raise ValueError("secure_aggregation is not combined with dp here; use one of them")
        for name in (
            "secagg_max_weight",
            "secagg_clipping_range",
            "secagg_num_shares",
            "secagg_reconstruction_threshold",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not isinstance(self.secagg_quantization_range, int) or not (
            1 < self.secagg_quantization_range < 2**32
        ):
            raise ValueError("secagg_quantization_range must be an integer in (1, 2**32)")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")


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
        from moerge.router_training.federation import run_federated_rounds

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
        return {**self._base_state(), **self.frozen_arrays(), **self.arrays()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._load_base_state(state)
        for name in FROZEN_ARRAYS:
            setattr(self, name, state[name].to(torch.float32).contiguous())
        self.set_arrays(state)


@dataclass
class ContributorData:
    """One contributor's local training data: pooled embeddings of its own examples.

    ``embeddings`` [n, H] are :func:`~moerge.embedding.pooled_embeddings` of
    the contributor's data; ``expert_ids`` [n] name the contributor's expert for each row (one id
    for a contributor with one expert). They stay on the contributor.
    """

    embeddings: torch.Tensor
    expert_ids: list[str]

    @classmethod
    def single_expert(cls, embeddings: torch.Tensor, expert_id: str) -> ContributorData:
        return cls(embeddings=embeddings, expert_ids=[expert_id] * int(embeddings.shape[0]))

    def labels(self, expert_ids: Sequence[str]) -> torch.Tensor:
        """Row labels as indices into the router's ``expert_ids``; ``ValueError`` if unknown."""
        index = {e: i for i, e in enumerate(expert_ids)}
        unknown = sorted({e for e in self.expert_ids if e not in index})
        if unknown:
            raise ValueError(f"contributor data names experts the router lacks: {unknown[:5]}")
        return torch.tensor([index[e] for e in self.expert_ids], dtype=torch.long)


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
