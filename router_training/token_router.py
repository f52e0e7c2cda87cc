"""What the token-level routers share: one vector per (module, expert), top-k per token.

Arrow and PHATGOOSE both keep, for every adapted module ``m`` (its path in the base model, e.g.
``encoder.layer.0.attention.self.query``), a matrix of expert vectors ``V_m`` [E_m, d_in] and
score each token ``h`` [d_in] of that module's input against them; they differ only in the
vectors and the score. An expert that does not adapt module ``m`` has no row in ``V_m``:
``members_m`` [E_m] maps rows to indices into ``expert_ids``, so decisions always index experts
globally, and ``top_k`` is bounded by ``E_m`` in that module.

Artifact tensors: ``vectors/<module>`` [E_m, d_in] and ``members/<module>`` [E_m] (int64).

Scores are computed on the hidden states' device, in their precision when that is half
precision (as PEFT's ``ArrowLoraLinearLayer`` does in the adapters' dtype) and in float32
otherwise; each module's table is copied there once and cached, not on every call. A score is a
matmul ``linear_scores`` (``[N, d_in] @ V_m^T``), optionally made absolute (Arrow); on CUDA the
absolute value, the top-k, the softmax and the map to global expert indices then run as one
Triton kernel (:mod:`.topk_triton`) that reads the ``[N, E_m]`` scores once.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from moerge.router_training import topk_triton
from moerge.router_training.base import (
    Granularity,
    Router,
    RouterConfig,
    RoutingDecision,
    top_k_softmax,
)

VECTORS_PREFIX = "vectors/"
MEMBERS_PREFIX = "members/"


def score_dtype(hidden: torch.Tensor) -> torch.dtype:
    """Half-precision hidden states are scored in their own dtype, anything else in float32."""
    return hidden.dtype if hidden.dtype in (torch.bfloat16, torch.float16) else torch.float32


class ModuleVectorRouter(Router):
    """Token-level router over per-module expert vectors (see the module docstring)."""

    granularity: ClassVar[Granularity] = "token"
    #: whether a token's score is ``|linear score|`` (Arrow) rather than the linear score itself
    absolute_scores: ClassVar[bool] = False

    def __init__(self, config: RouterConfig, expert_ids: Sequence[str]) -> None:
        super().__init__(config, expert_ids)
        self.vectors: dict[str, torch.Tensor] = {}
        self.members: dict[str, torch.Tensor] = {}
        self._placed: dict[tuple[str, torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    @property
    def modules(self) -> list[str]:
        return sorted(self.vectors)

    @property
    def temperature(self) -> float:
        return float(self.config.temperature)  # type: ignore[attr-defined]

    def _set_vectors(self, per_module: Mapping[str, Sequence[tuple[int, torch.Tensor]]]) -> None:
        """Stack ``{module: [(expert index, vector [d_in]), ...]}`` into the routing tables."""
        self.vectors, self.members = {}, {}
        for module in sorted(per_module):
            rows = sorted(per_module[module], key=lambda item: item[0])
            dims = {int(v.shape[-1]) for _, v in rows}
            if len(dims) != 1:
                raise ValueError(f"module {module!r}: experts disagree on its input size {dims}")
            self.members[module] = torch.tensor([i for i, _ in rows], dtype=torch.long)
            self.vectors[module] = torch.stack([v.to(torch.float32) for _, v in rows])
        self._placed = {}

    def _lookup(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.vectors[module], self.members[module]
        except KeyError:
            raise ValueError(
                f"router '{self.method}' does not route module {module!r}; "
                f"known modules: {self.modules}"
            ) from None

    def _placed_for(self, module: str, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's ``(vectors, members)`` on ``hidden``'s device, vectors in the score
        dtype (see the module docstring); cached per module, device and dtype."""
        dtype = score_dtype(hidden)
        key = (module, hidden.device, dtype)
        placed = self._placed.get(key)
        if placed is None:
            vectors, members = self._lookup(module)
            placed = (vectors.to(hidden.device, dtype), members.to(hidden.device))
            self._placed[key] = placed
        return placed  # type: ignore[return-value]

    @abstractmethod
    def linear_scores(self, module: str, hidden: torch.Tensor) -> torch.Tensor:
        """Each token's projection onto the module's expert vectors: ``[N, d_in] -> [N, E_m]``,
        a new tensor (routing may overwrite it)."""

    def scores(self, module: str, hidden: torch.Tensor) -> torch.Tensor:
        """Routing scores of each token against the module's experts: ``[N, d_in] -> [N, E_m]``,
        a new tensor (routing may overwrite it)."""
        scores = self.linear_scores(module, hidden)
        return scores.abs_() if self.absolute_scores else scores

    def route_tokens(
        self, module: str, hidden: torch.Tensor, top_k: int | None = None
    ) -> RoutingDecision:
        vectors, members = self._placed_for(module, hidden)
        if hidden.ndim != 2 or hidden.shape[1] != vectors.shape[1]:
            raise ValueError(
                f"module {module!r} expects hidden states [N, {vectors.shape[1]}], "
                f"got {tuple(hidden.shape)}"
            )
        k = self._resolve_top_k(top_k, num_candidates=len(members))
        linear = self.linear_scores(module, hidden)
        kept = topk_triton.try_top_k_softmax(  # CUDA: |score|, top-k, softmax, ids in one kernel
            linear, k, self.temperature, absolute=self.absolute_scores, members=members
        )
        if kept is not None:
            return RoutingDecision(indices=kept[0], weights=kept[1])
        scores = linear.abs_() if self.absolute_scores else linear
        local = top_k_softmax(scores, k, self.temperature, scratch=True)
        return RoutingDecision(indices=members[local.indices], weights=local.weights)

    def zero_vector_experts(self) -> list[str]:
        """Experts whose vector is zero in every module: the router knows nothing about them.

        An Arrow prototype is zero when the expert's LoRA update ``B A`` is zero (a LoRA left at
        its initialisation, ``B = 0``, e.g. when training kept the linear probe's start): Arrow
        scores ``|<h, 0>| = 0`` and never picks it first. A PHATGOOSE gate stays at its zero
        start when no gradient reaches it through such an update: every token scores 0, so the
        expert is picked exactly when all the other experts score below 0, for no reason of its
        own.
        """
        informed: set[int] = set()
        for module, vectors in self.vectors.items():
            nonzero = vectors.abs().amax(dim=1) > 0  # [E_m]
            informed.update(self.members[module][nonzero].tolist())
        return [e for i, e in enumerate(self.expert_ids) if i not in informed]

    def vector_similarity(self, max_experts: int = 1024, seed: int = 0) -> dict[str, float]:
        """Mean and max ``|cos|`` between different experts' vectors, over all modules.

        Modules with more than ``max_experts`` experts are measured on a seeded random subset
        of that many (the full ``E x E`` matrix would cost ``O(E^2)`` memory).
        """
        means, maxes = [], []
        generator = torch.Generator().manual_seed(seed)
        for vectors in self.vectors.values():
            if len(vectors) > max_experts:
                vectors = vectors[torch.randperm(len(vectors), generator=generator)[:max_experts]]
            if len(vectors) < 2:
                continue
            unit = F.normalize(vectors, dim=-1)
            cos = (unit @ unit.T).abs()
            off = cos[~torch.eye(len(vectors), dtype=torch.bool)]
            means.append(float(off.mean()))
            maxes.append(float(off.max()))
        if not means:
            return {}
        return {"mean_abs_cos": sum(means) / len(means), "max_abs_cos": max(maxes)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for module in self.modules:
            state[VECTORS_PREFIX + module] = self.vectors[module]
            state[MEMBERS_PREFIX + module] = self.members[module]
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        modules = sorted(k[len(VECTORS_PREFIX) :] for k in state if k.startswith(VECTORS_PREFIX))
        self.vectors = {m: state[VECTORS_PREFIX + m].to(torch.float32) for m in modules}
        self.members = {m: state[MEMBERS_PREFIX + m].to(torch.long) for m in modules}
        self._placed = {}
