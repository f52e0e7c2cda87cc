"""One interface for every routing method (fit from registry records, route, save, load).

Modelled on PEFT's ``tuners/poly/router.py``: a small abstract ``Router`` behind a factory
(:mod:`moerge.router_training.registry`). Two granularities exist in the MoErging survey
(Yadav et al., 2024, "A Survey on Model MoErging"):

* **example-level** routers score a pooled input embedding ``[B, H]`` against the experts and
  pick the top-k experts per example (centroid, statistics, federated routers);
* **token-level** routers score every token's hidden state ``[N, d_in]`` inside each adapted
  module and pick the top-k experts per token and module (Arrow, PHATGOOSE).

Both yield the same thing: expert *indices* into ``router.expert_ids`` and their *weights*
(non-negative, summing to 1 per row). The inference engine mixes experts from that alone and
never needs to know which method produced it.

A router is saved as one safetensors file: its tensors, plus string metadata
(``method``, ``config`` as JSON, ``expert_ids`` as JSON) in the safetensors header. Nothing is
ever pickled.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors.torch import load_file, save_file

Granularity = Literal["example", "token"]


@dataclass
class LoraModuleWeights:
    """One adapted linear layer of one expert: ``delta W = scaling * B @ A``.

    Shapes: ``A`` [r, d_in], ``B`` [d_out, r].
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float


@dataclass
class ExpertStatistics:
    """The uploaded statistics of one expert, as tensors (see :mod:`moerge.expert_format`).

    Shapes: ``mean`` [H], ``cov_diag`` [H], ``cov_factor`` [H, k], each gate [d_in].
    """

    example_count: int
    mean: torch.Tensor
    cov_diag: torch.Tensor
    cov_factor: torch.Tensor
    gates: dict[str, torch.Tensor] = field(default_factory=dict)
    label_names: list[str] = field(default_factory=list)
    dp_noise_std: dict[str, float] = field(default_factory=dict)


@dataclass
class ExpertRecord:
    """What a router may learn from: an expert's id, its statistics and (lazily) its adapter.

    ``load_lora`` returns the expert's LoRA modules keyed by the module's path in the base
    model (e.g. ``encoder.layer.0.attention.self.query``); it is a callable so that fitting over
    thousands of experts never holds every adapter in memory at once.
    """

    expert_id: str
    task_name: str = ""
    statistics: ExpertStatistics | None = None
    load_lora: Callable[[], dict[str, LoraModuleWeights]] | None = None


@dataclass
class RoutingDecision:
    """Top-k choice per row: ``indices`` [R, k] (long) into ``expert_ids``, ``weights`` [R, k].

    For example-level routing a row is an example; for token-level routing it is a token of one
    module's input.
    """

    indices: torch.Tensor
    weights: torch.Tensor


@dataclass
class RouterConfig:
    """Fields every method shares. Subclasses add their own, each with a comment."""

    top_k: int = 1  # experts per example (or per token and module)

    def validate(self) -> None:
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class Router(ABC):
    """A fitted routing method over a fixed, ordered list of experts."""

    method: ClassVar[str]
    granularity: ClassVar[Granularity]
    config_class: ClassVar[type[RouterConfig]] = RouterConfig
    #: whether the router sees raw data labels at fit time (only the oracle baseline does)
    evaluation_only: ClassVar[bool] = False

    def __init__(self, config: RouterConfig, expert_ids: Sequence[str]) -> None:
        config.validate()
        self.config = config
        self.expert_ids = list(expert_ids)

    @property
    def num_experts(self) -> int:
        return len(self.expert_ids)

    # -- fitting ------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def fit(cls, experts: Sequence[ExpertRecord], config: RouterConfig) -> Router:
        """Fit from experts' adapters and/or statistics alone (never raw data)."""

    # -- routing ------------------------------------------------------------------------------
    def route_examples(self, embeddings: torch.Tensor, top_k: int | None = None) -> RoutingDecision:
        """Example-level routing: ``embeddings`` [B, H] -> decision with rows = examples."""
        raise TypeError(f"router '{self.method}' routes tokens, not examples")

    def route_tokens(
        self, module: str, hidden: torch.Tensor, top_k: int | None = None
    ) -> RoutingDecision:
        """Token-level routing inside ``module``: ``hidden`` [N, d_in] -> rows = tokens."""
        raise TypeError(f"router '{self.method}' routes examples, not tokens")

    @property
    def modules(self) -> list[str]:
        """Module paths a token-level router routes in (empty for example-level routers)."""
        return []

    # -- serialisation ------------------------------------------------------------------------
    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that, with the config and expert ids, fully describe the fitted router."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""

    def save(self, path: str | Path) -> None:
        metadata = {
            "method": self.method,
            "config": self.config.to_json(),
            "expert_ids": json.dumps(self.expert_ids),
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata=metadata)

    @staticmethod
    def read_metadata(path: str | Path) -> dict[str, Any]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if "method" not in meta:
            raise ValueError(f"{path}: not a moerge router artifact (no 'method' metadata)")
        return {
            "method": meta["method"],
            "config": json.loads(meta.get("config", "{}")),
            "expert_ids": json.loads(meta.get("expert_ids", "[]")),
        }

    def _resolve_top_k(self, top_k: int | None) -> int:
        k = self.config.top_k if top_k is None else top_k
        if k < 1 or k > self.num_experts:
            raise ValueError(f"top_k must be between 1 and {self.num_experts}, got {k}")
        return k


def top_k_softmax(scores: torch.Tensor, k: int, temperature: float = 1.0) -> RoutingDecision:
    """Keep the k best scores per row and softmax over them: ``scores`` [R, E] -> [R, k]."""
    values, indices = torch.topk(scores, k, dim=-1)
    weights = torch.softmax(values / temperature, dim=-1)
    return RoutingDecision(indices=indices, weights=weights)


def load_router(path: str | Path) -> Router:
    """Read any router artifact written by :meth:`Router.save`."""
    from moerge.router_training.registry import get_router_class

    meta = Router.read_metadata(path)
    cls = get_router_class(meta["method"])
    config = cls.config_class(**meta["config"])
    router = cls(config, meta["expert_ids"])
    router.load_state_dict(load_file(str(path)))
    return router
