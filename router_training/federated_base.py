"""What the federated wing shares: the router's settings, a contributor's data, what a round
exchanges, and what a round needs of the router it trains.

The wing, from the bottom up (each module imports only the ones above it in this list):

* this module, and :mod:`.federated_privacy` (the privacy accountant of DP rounds);
* :mod:`.flower_client`: the contributor's ``ClientApp`` (local SGD on its own embeddings);
* :mod:`.flower_server`: the coordinator's strategy (FedAvg, DP wrappers) and ``ServerApp``;
* :mod:`.secure_aggregation`: opt-in SecAgg+ rounds;
* :mod:`.federated_rounds`: runs rounds in this process or in Flower's simulation engine;
* :mod:`.federated`: the router (method ``federated``): LDA, then rounds;
* :mod:`.superlink`: rounds with real contributors over a Flower SuperLink.

The Flower side trains any :class:`RoundsRouter`; :class:`~.federated.FederatedRouter` is the
one that exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Self, runtime_checkable

import torch

from moerge.router_training.gaussian import GaussianRouterConfig
from moerge.router_training.lda import LDARouterConfig

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
    """LDA initialisation plus FedAvg rounds; see :mod:`.federated` for the model."""

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
        """Refuse out-of-range settings with a ``ValueError`` naming the field (configs come from
        JSON and the CLI)."""
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
        """A contributor's embeddings that all belong to one expert (the usual case: one
        contributor, one task)."""
        return cls(embeddings=embeddings, expert_ids=[expert_id] * int(embeddings.shape[0]))

    def labels(self, expert_ids: Sequence[str]) -> torch.Tensor:
        """Row labels as indices into the router's ``expert_ids``; ``ValueError`` if unknown."""
        index = {e: i for i, e in enumerate(expert_ids)}
        unknown = sorted({e for e in self.expert_ids if e not in index})
        if unknown:
            raise ValueError(f"contributor data names experts the router lacks: {unknown[:5]}")
        return torch.tensor([index[e] for e in self.expert_ids], dtype=torch.long)


@runtime_checkable
class RoundsRouter(Protocol):
    """What a federated round reads and writes of the router it trains."""

    config: FederatedRouterConfig
    expert_ids: list[str]
    temperature: float

    def arrays(self) -> dict[str, torch.Tensor]:
        """The tensors a round trains and averages (:data:`FEDERATED_ARRAYS`)."""
        ...

    def frozen_arrays(self) -> dict[str, torch.Tensor]:
        """The fixed tensors a round sends along (:data:`FROZEN_ARRAYS`)."""
        ...

    def set_arrays(self, arrays: dict[str, torch.Tensor]) -> None:
        """Replace the trained tensors."""
        ...

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Routing logits [N, E] of pooled embeddings [N, H] (server-side evaluation)."""
        ...

    def copy(self) -> Self:
        """An independent router with the same config, experts and tensors."""
        ...
