"""Reference points every MoErging evaluation needs (Yadav et al., 2024, Sec. 5).

* ``uniform``: every expert with weight ``1 / E`` for every input -- mixing the experts' outputs
  with equal weights, i.e. the uniform merge baseline (for LoRA the engine may equivalently merge
  ``delta W = (1/E) sum_e B_e A_e`` once). ``top_k`` is always ``E``.
* ``base``: no expert at all -- the frozen base model. Its decisions have ``k = 0``: ``indices``
  and ``weights`` are ``[R, 0]``, and ``top_k`` may only be ``0`` (the one router allowed to).
* ``oracle``: each example goes to the expert trained on the example's own task (weight 1). It
  needs the true source expert of every example, so it cannot route embeddings; it is
  ``evaluation_only`` and routes with :meth:`OracleRouter.route_sources`.

None of them has tensors to fit; their artifacts hold only metadata (method, config, expert ids).
All route either granularity: a decision for examples or, identically, for the tokens of any
module.
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
    Router,
    RouterConfig,
    RoutingDecision,
)
from moerge.router_training.methods import register_router


class _InputFreeRouter(Router):
    """A router whose decision does not depend on the input, only on its number of rows."""

    granularity: ClassVar[Granularity] = "example"

    @classmethod
    def fit(cls, experts: Sequence[ExpertRecord], config: RouterConfig) -> Router:
        return cls(config, [e.expert_id for e in experts])

    @abstractmethod
    def _decide(self, rows: int, top_k: int | None) -> RoutingDecision:
        """The decision for ``rows`` inputs."""

    def route_examples(self, embeddings: torch.Tensor, top_k: int | None = None) -> RoutingDecision:
        if embeddings.ndim != 2:
            raise ValueError(f"expected embeddings [B, H], got {tuple(embeddings.shape)}")
        return self._decide(embeddings.shape[0], top_k)

    def route_tokens(
        self, module: str, hidden: torch.Tensor, top_k: int | None = None
    ) -> RoutingDecision:
        if hidden.ndim != 2:
            raise ValueError(f"expected hidden states [N, d_in], got {tuple(hidden.shape)}")
        return self._decide(hidden.shape[0], top_k)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"router '{self.method}' has no tensors, got {sorted(state)}")


@dataclass
class UniformRouterConfig(RouterConfig):
    """Uniform mixture of every expert."""

    top_k: int | None = None  # None or the number of experts: the uniform router uses them all

    def validate(self) -> None:
        """``top_k`` is optional here (None: every expert); a given one is checked as any
        router's."""
        if self.top_k is not None:
            super().validate()


@register_router
class UniformRouter(_InputFreeRouter):
    """Every expert, weight ``1 / E``."""

    method: ClassVar[str] = "uniform"
    config_class: ClassVar[type[RouterConfig]] = UniformRouterConfig
    config: UniformRouterConfig

    def __init__(self, config: UniformRouterConfig, expert_ids: Sequence[str]) -> None:
        super().__init__(config, expert_ids)
        if not self.expert_ids:
            raise ValueError("the uniform router needs at least one expert")
        if config.top_k is not None and config.top_k != self.num_experts:
            raise ValueError(
                f"the uniform router uses all {self.num_experts} experts; top_k={config.top_k}"
            )

    def _decide(self, rows: int, top_k: int | None) -> RoutingDecision:
        num = self.num_experts
        if top_k is not None:
            self._resolve_top_k(top_k)
            if top_k != num:
                raise ValueError(f"the uniform router uses all {num} experts; top_k={top_k}")
        return RoutingDecision(
            indices=torch.arange(num).expand(rows, num).clone(),
            weights=torch.full((rows, num), 1.0 / num),
        )


@dataclass
class BaseModelRouterConfig(RouterConfig):
    """The frozen base model: no expert."""

    top_k: int = 0  # always 0: no expert is used

    def validate(self) -> None:
        """The base-model router routes to no expert: ``top_k`` must be 0."""
        if self.top_k != 0 or isinstance(self.top_k, bool):
            raise ValueError(f"the base router uses no expert: top_k must be 0, got {self.top_k!r}")


@register_router
class BaseModelRouter(_InputFreeRouter):
    """Routes to no expert: empty ``[R, 0]`` decisions."""

    method: ClassVar[str] = "base"
    config_class: ClassVar[type[RouterConfig]] = BaseModelRouterConfig
    config: BaseModelRouterConfig

    def _decide(self, rows: int, top_k: int | None) -> RoutingDecision:
        if top_k not in (None, 0) or isinstance(top_k, bool):
            raise ValueError(f"the base router uses no expert: top_k must be 0, got {top_k!r}")
        return RoutingDecision(
            indices=torch.empty(rows, 0, dtype=torch.long), weights=torch.empty(rows, 0)
        )


@dataclass
class OracleRouterConfig(RouterConfig):
    """Route every example to its own source expert."""

    top_k: int = 1  # always 1: the source expert alone

    def validate(self) -> None:
        """The oracle picks exactly the example's source expert: ``top_k`` must be 1."""
        if self.top_k != 1 or isinstance(self.top_k, bool):
            raise ValueError(
                f"the oracle routes to one expert: top_k must be 1, got {self.top_k!r}"
            )


@register_router
class OracleRouter(Router):
    """Evaluation-only: each example to the expert that was trained on its task."""

    method: ClassVar[str] = "oracle"
    granularity: ClassVar[Granularity] = "example"
    config_class: ClassVar[type[RouterConfig]] = OracleRouterConfig
    evaluation_only: ClassVar[bool] = True
    config: OracleRouterConfig

    def __init__(self, config: OracleRouterConfig, expert_ids: Sequence[str]) -> None:
        super().__init__(config, expert_ids)
        self._index = {expert_id: i for i, expert_id in enumerate(self.expert_ids)}

    @classmethod
    def fit(cls, experts: Sequence[ExpertRecord], config: RouterConfig) -> OracleRouter:
        """Nothing to fit: the oracle only needs the expert ids, to look up each example's
        source."""
        return cls(config, [e.expert_id for e in experts])  # type: ignore[arg-type]

    def route_sources(
        self, source_expert_ids: Sequence[str], top_k: int | None = None
    ) -> RoutingDecision:
        """One row per example: its source expert, weight 1. ``top_k`` may only be 1."""
        self._resolve_top_k(top_k, num_candidates=1)
        unknown = sorted({s for s in source_expert_ids if s not in self._index})
        if unknown:
            raise ValueError(f"unknown source expert ids: {unknown[:10]}")
        indices = torch.tensor([self._index[s] for s in source_expert_ids], dtype=torch.long)
        return RoutingDecision(
            indices=indices.reshape(-1, 1), weights=torch.ones(len(source_expert_ids), 1)
        )

    def route_examples(self, embeddings: torch.Tensor, top_k: int | None = None) -> RoutingDecision:
        """Refused: the oracle cannot route from embeddings, only from known sources
        (:meth:`route_sources`)."""
        raise TypeError(
            "the oracle router needs each example's source expert: use route_sources(ids)"
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """No tensors: expert ids and config describe the oracle fully."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Accept only an empty state, so an artifact of another method is not taken for an
        oracle."""
        if state:
            raise ValueError(f"router '{self.method}' has no tensors, got {sorted(state)}")
