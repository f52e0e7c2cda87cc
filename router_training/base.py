"""One interface for every routing method (fit from registry records, route, save, load).

Modelled on PEFT's ``tuners/poly/router.py``: a small abstract ``Router`` behind a factory
(:mod:`moerge.router_training.methods`). Two granularities exist in the MoErging survey
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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeGuard

import torch
from safetensors.torch import load_file, save_file

from moerge.router_training import topk_triton

Granularity = Literal["example", "token"]
Needs = Literal["statistics", "gates", "adapter", "nothing"]


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
    module's input. Weights are non-negative and sum to 1 per row, except for ``k == 0``: the
    ``base`` router routes to no expert at all and returns ``[R, 0]`` tensors (use the frozen
    base model alone).
    """

    indices: torch.Tensor
    weights: torch.Tensor

    @property
    def k(self) -> int:
        """Experts per row (0 for the ``base`` router)."""
        return int(self.indices.shape[-1])

    def to_dense(self, num_experts: int) -> torch.Tensor:
        """Scatter into a dense ``[R, num_experts]`` weight matrix (zeros off the top-k)."""
        dense = self.weights.new_zeros(self.indices.shape[0], num_experts)
        if self.k:
            dense.scatter_(1, self.indices, self.weights)
        return dense


@dataclass
class RouterConfig:
    """Fields every method shares. Subclasses add their own, each with a comment."""

    # Experts per example (or per token and module). None only where a subclass allows it: the
    # uniform router's "every expert", so readers of a router's config handle None.
    top_k: int | None = 1

    def validate(self) -> None:
        """Refuse out-of-range settings with a ``ValueError`` naming the field (configs come from
        JSON and the CLI)."""
        if not _is_int(self.top_k) or self.top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")

    def to_json(self) -> str:
        """The config as sorted-key JSON: stored in router artifacts and compared between fits."""
        return json.dumps(asdict(self), sort_keys=True)


class Router(ABC):
    """A fitted routing method over a fixed, ordered list of experts."""

    method: ClassVar[str]
    granularity: ClassVar[Granularity]
    config_class: ClassVar[type[RouterConfig]] = RouterConfig
    #: whether the router sees raw data labels at fit time (only the oracle baseline does)
    evaluation_only: ClassVar[bool] = False
    #: what the router learns each expert from (see :func:`missing_input`): ``"statistics"``
    #: (the uploaded embedding Gaussian), ``"gates"`` (PHATGOOSE gate vectors), ``"adapter"``
    #: (the LoRA weights) or ``"nothing"``
    needs: ClassVar[Needs] = "nothing"

    def __init__(self, config: RouterConfig, expert_ids: Sequence[str]) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"router '{self.method}' needs a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        config.validate()
        self.config = config
        self.expert_ids = list(expert_ids)
        top_k = getattr(config, "top_k", None)
        if _is_int(top_k) and top_k > len(self.expert_ids):
            raise ValueError(
                f"top_k={top_k} exceeds the number of experts ({len(self.expert_ids)})"
            )
        if len(set(self.expert_ids)) != len(self.expert_ids):
            dupes = sorted(e for e, n in Counter(self.expert_ids).items() if n > 1)
            raise ValueError(f"duplicate expert ids: {dupes}")

    @property
    def num_experts(self) -> int:
        """How many experts the router was fitted on (the columns of its decisions)."""
        return len(self.expert_ids)

    # -- fitting ------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def fit(cls, experts: Sequence[ExpertRecord], config: RouterConfig) -> Router:
        """Fit from experts' adapters and/or statistics alone (never raw data)."""

    #: whether :meth:`extended` adds experts without a refit (their own parameters only)
    incremental: ClassVar[bool] = False

    def extended(self, experts: Sequence[ExpertRecord]) -> Router:
        """A new router over this one's experts followed by ``experts``, equal to a refit over
        all of them but computed from the new experts alone (methods whose parameters are per
        expert, e.g. Arrow's prototypes). This router is left unchanged."""
        raise NotImplementedError(f"router '{self.method}' cannot add experts without a refit")

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
        """Write the router as a safetensors artifact: its tensors, with the method, config and
        expert ids as metadata."""
        metadata = {
            "method": self.method,
            "config": self.config.to_json(),
            "expert_ids": json.dumps(self.expert_ids),
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata=metadata)

    @staticmethod
    def read_metadata(path: str | Path) -> dict[str, Any]:
        """The method, config and expert ids of an artifact, read without loading its tensors;
        ``ValueError`` for a file that is not a router."""
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

    def _resolve_top_k(self, top_k: int | None, num_candidates: int | None = None) -> int:
        """``top_k`` (or the config's) checked against the candidates: 1 <= k <= candidates.

        ``num_candidates`` defaults to every expert; token-level routers pass the number of
        experts that adapt the module being routed.
        """
        k = self.config.top_k if top_k is None else top_k
        limit = self.num_experts if num_candidates is None else num_candidates
        if not _is_int(k) or k < 1 or k > limit:
            raise ValueError(f"top_k must be an integer between 1 and {limit}, got {k!r}")
        return k


def _is_int(value: object) -> TypeGuard[int]:
    """An int that is not a bool (JSON configs and callers may pass either)."""
    return isinstance(value, int) and not isinstance(value, bool)


def top_k_softmax(
    scores: torch.Tensor, k: int, temperature: float = 1.0, *, scratch: bool = False
) -> RoutingDecision:
    """Keep the k best scores per row and softmax over them: ``scores`` [R, E] -> [R, k].

    ``softmax(topk(scores) / temperature)``: equal to the softmax over all E scores restricted to
    the top-k and renormalised, so posterior logits give renormalised top-k posteriors.
    ``scratch=True`` lets it overwrite ``scores`` (a temporary of the caller) instead of copying.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    kept = topk_triton.try_top_k_softmax(scores, k, temperature)
    if kept is not None:
        return RoutingDecision(indices=kept[0], weights=kept[1])
    if scores.device.type == "cuda" and k <= _MAX_K_BY_MAX and scores.shape[-1] >= _MIN_E_BY_MAX:
        values, indices = _top_k_by_max(scores, k, scratch=scratch)
    else:
        values, indices = torch.topk(scores, k, dim=-1)
    weights = torch.softmax(values / temperature, dim=-1)
    return RoutingDecision(indices=indices, weights=weights)


#: On CUDA without Triton, top-k for k up to this over rows of at least ``_MIN_E_BY_MAX`` scores
#: is taken by k row maxima. Measured on an H100, [16384, E] bf16 Arrow scores, top-2 and
#: softmax: at E = 1024 0.45 ms with ``torch.topk`` (4.8x the scoring matmul) against 0.18 ms
#: by maxima; at E = 64 ``torch.topk`` was the faster (0.19 against 0.36 ms).
_MAX_K_BY_MAX = 4
_MIN_E_BY_MAX = 256


def _top_k_by_max(
    scores: torch.Tensor, k: int, *, scratch: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k)`` (sorted, largest first) as k row maxima: [R, E] -> 2 x [R, k].

    Ties may resolve to a different index than ``torch.topk``'s; the values are the same. Marks
    the maxima found in a copy of ``scores``, or in ``scores`` itself with ``scratch=True``.
    """
    work = scores if scratch or k == 1 else scores.clone()
    values, indices = [], []
    for j in range(k):
        value, index = work.max(dim=-1, keepdim=True)  # [R, 1]
        values.append(value)
        indices.append(index)
        if j + 1 < k:
            work.scatter_(-1, index, float("-inf"))
    return torch.cat(values, dim=-1), torch.cat(indices, dim=-1)


def load_router(path: str | Path) -> Router:
    """Read any router artifact written by :meth:`Router.save`."""
    from moerge.router_training.methods import get_router_class

    meta = Router.read_metadata(path)
    cls = get_router_class(meta["method"])
    try:
        config = cls.config_class(**meta["config"])
    except TypeError as exc:
        raise ValueError(f"{path}: config does not fit method '{meta['method']}': {exc}") from None
    router = cls(config, meta["expert_ids"])
    router.load_state_dict(load_file(str(path)))
    return router


def missing_input(needs: Needs, expert: ExpertRecord) -> str:
    """Why a router that learns from ``needs`` cannot route ``expert`` ("" when it can).

    Adapter-only experts (no statistics of any data, see :mod:`moerge.expert_format`) lack
    both the embedding statistics and the gates; an expert uploaded without gates lacks those.
    """
    if needs == "statistics" and expert.statistics is None:
        return "adapter-only expert: no data statistics"
    if needs == "gates" and (expert.statistics is None or not expert.statistics.gates):
        return "no PHATGOOSE gates"
    if needs == "adapter" and expert.load_lora is None:
        return "no LoRA adapter to load"
    return ""
