"""Centroid (retrieval) routing: cosine similarity of the input to each expert's mean embedding.

Jang et al. (2023), "Exploring the Benefits of Training Expert Language Models over Instruction
Tuning", retrieve the expert whose training data embeds closest to the input; LoraRetriever
(Zhao et al., 2024, "LoraRetriever: Input-Aware LoRA Retrieval and Composition for Mixed Tasks
in the Wild") retrieves the top-k LoRAs by embedding similarity and mixes them. Here each expert
is represented by the mean ``mu_e`` [H] of its L2-normalised pooled embeddings (uploaded in its
statistics), and for an input embedding ``x`` [H]::

    s_e(x)   = <x / ||x||, mu_e / ||mu_e||>                cosine similarity, in [-1, 1]
    weights  = softmax( topk_e(s(x)) / T )                 over the k most similar experts

``T`` is ``temperature`` or, with ``calibrate=True``, fitted by NLL on labelled samples drawn
from the experts' uploaded Gaussians (:mod:`moerge.router_training.gaussian`). Routing is one
``[B, H] x [H, E]`` product (:class:`~moerge.router_training.scoring.LinearScorer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

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
from moerge.router_training.gaussian import GaussianBank, as_float_batch
from moerge.router_training.methods import register_router
from moerge.router_training.scoring import LinearScorer, check_score_dtype


@dataclass
class CentroidRouterConfig(RouterConfig):
    """Cosine retrieval over expert mean embeddings."""

    temperature: float = 0.1  # softmax temperature over cosine similarities
    calibrate: bool = False  # replace temperature by one fitted on draws from the Gaussians
    calibration_samples: int = 2048  # labelled draws (uniform over experts) for that fit
    seed: int = 0  # seeds the calibration draws
    score_dtype: str = "float32"  # "float32" or "bfloat16" for the routing product

    def validate(self) -> None:
        """Refuse out-of-range settings with a ``ValueError`` naming the field (configs come from
        JSON and the CLI)."""
        super().validate()
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.calibrate, bool):
            raise ValueError(f"calibrate must be a bool, got {self.calibrate!r}")
        if not isinstance(self.calibration_samples, int) or self.calibration_samples < 16:
            raise ValueError(
                f"calibration_samples must be an integer >= 16, got {self.calibration_samples!r}"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        check_score_dtype(self.score_dtype)


@register_router
class CentroidRouter(Router):
    """Top-k experts by cosine similarity of mean embeddings (example-level).

    Fitted tensors: ``centroids`` [E, H] (unit norm) and ``temperature`` [1].
    """

    needs: ClassVar[Needs] = "statistics"

    method: ClassVar[str] = "centroid"
    granularity: ClassVar[Granularity] = "example"
    config_class: ClassVar[type[RouterConfig]] = CentroidRouterConfig
    config: CentroidRouterConfig

    def __init__(self, config: CentroidRouterConfig, expert_ids: Sequence[str]) -> None:
        super().__init__(config, expert_ids)
        self.temperature = float(config.temperature)
        self._set_centroids(torch.zeros(self.num_experts, 0))  # filled by fit / load_state_dict

    @classmethod
    def fit(cls, experts: Sequence[ExpertRecord], config: RouterConfig) -> CentroidRouter:
        """Centroids are the experts' normalised embedding means; the temperature is fitted on
        samples drawn from their Gaussians when ``calibrate`` is set."""
        router = cls(config, [e.expert_id for e in experts])  # type: ignore[arg-type]
        bank = GaussianBank.from_experts(experts)
        router._set_centroids(F.normalize(bank.means, dim=-1))
        if router.config.calibrate:
            generator = torch.Generator().manual_seed(router.config.seed)
            uniform = torch.full((bank.num_experts,), 1.0 / bank.num_experts)
            x, y = bank.draw_labelled(router.config.calibration_samples, uniform, generator)
            router.temperature = fit_temperature(router.similarities(x), y)
        return router

    def _set_centroids(self, centroids: torch.Tensor) -> None:
        self.centroids = centroids.to(torch.float32).contiguous()
        hidden = self.centroids.shape[1]
        self._scorer = LinearScorer(
            self.centroids.T,
            torch.zeros(self.num_experts),
            torch.zeros(hidden),
            self.config.score_dtype,
        )

    def similarities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarity to every expert: ``[B, H] -> [B, E]``."""
        x = as_float_batch(embeddings, self._scorer.hidden_size)
        return self._scorer(F.normalize(x, dim=-1))

    def route_examples(self, embeddings: torch.Tensor, top_k: int | None = None) -> RoutingDecision:
        """Softmax over the top-k cosine similarities to the centroids, at the fitted
        temperature."""
        k = self._resolve_top_k(top_k)
        return top_k_softmax(self.similarities(embeddings), k, self.temperature)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The centroids and the temperature (float64, so it round-trips exactly)."""
        return {
            "centroids": self.centroids,
            "temperature": torch.tensor([self.temperature], dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""
        self._set_centroids(state["centroids"])
        self.temperature = float(state["temperature"][0])
