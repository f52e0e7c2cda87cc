"""How a request's inputs are routed and combined: the engine's one input besides the texts.

A :class:`RoutingPlan` is either

* **explicit**: per input, the chosen expert ids and weights (``[B][k]``), e.g. from
  ``RoutingPlan.from_decision(router, router.route_examples(...))`` or an admin's choice;
* **routed**: a router (or the engine's active router when ``router`` is ``None``) that the
  engine applies itself: example-level routers on :meth:`InferenceEngine.embed`, token-level
  routers inside every adapted module (module-level mixing).

plus the :class:`Aggregation` and, for TIES/DARE, :class:`MergeOptions`. Weights of each row are
normalised to sum 1 (an all-zero row is refused), except in a *signed* linear merge: a few-shot
composition (:mod:`moerge.router_training.composition`) is ``sum_j w_j B_j A_j`` with LoraHub's
raw weights, which may be negative and need not sum to 1, so they are used as given (the heads
of a classification merge take them scaled to unit L1 norm: ``classify.unit_l1``).

An :class:`InferenceRequest` is one caller's texts with their plan. Turning a routed plan into
an explicit one (embedding the texts, asking the router) is :mod:`.planning`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

import torch

from moerge.coordinator.inference.errors import InvalidPlan, InvalidTopK
from moerge.router_training.base import Router, RoutingDecision


class Aggregation(str, Enum):
    """How the chosen experts' contributions are combined (``moerge.v1.Aggregation``)."""

    #: run each chosen expert, combine outputs by routing weight
    ENSEMBLE = "ensemble"
    #: one adapter per input: sum_j w_j B_j A_j (exact, through the bank's routing)
    MERGE_LINEAR = "merge_linear"
    #: PEFT ``ties`` of the chosen adapters' LoRA factors, per input
    MERGE_TIES = "merge_ties"
    #: PEFT ``dare_linear`` of the LoRA factors, per input
    MERGE_DARE_LINEAR = "merge_dare_linear"
    #: PEFT ``dare_ties`` of the LoRA factors, per input
    MERGE_DARE_TIES = "merge_dare_ties"
    #: token-level routing inside every adapted module (Arrow, PHATGOOSE)
    MODULE_MIX = "module_mix"

    @property
    def is_merge(self) -> bool:
        """Whether the aggregation merges the experts' weights into one adapter."""
        return self.name.startswith("MERGE_")

    @property
    def merge_method(self) -> str:
        """PEFT's ``combination_type`` name (``ties``, ``dare_linear``, ...)."""
        if not self.is_merge:
            raise ValueError(f"{self.value} is not a merge")
        return self.value[len("merge_") :]


@dataclass(frozen=True)
class MergeOptions:
    """Parameters of TIES/DARE merging (see ``peft.utils.merge_utils``)."""

    density: float = 0.5  # fraction of each factor's entries kept by pruning
    majority_sign_method: Literal["total", "frequency"] = "total"
    seed: int = 0  # DARE's random pruning is seeded per expert combination: reproducible

    def validate(self) -> None:
        """Refuse a density outside (0, 1] or an unknown sign method (``InvalidPlan``)."""
        if not isinstance(self.density, (int, float)) or not 0.0 < self.density <= 1.0:
            raise InvalidPlan(f"merge density must be in (0, 1], got {self.density!r}")
        if self.majority_sign_method not in ("total", "frequency"):
            raise InvalidPlan(
                f"majority_sign_method must be total|frequency, got {self.majority_sign_method!r}"
            )


@dataclass(frozen=True)
class RoutingPlan:
    """Which experts serve each input and how they are combined (see the module docstring).

    Explicit plans: ``expert_ids`` [B][k] and ``weights`` [B, k]. Routed plans: ``router``
    (``None``: the engine's active router at execution time) with ``top_k`` (``None``: the
    router's default).
    """

    aggregation: Aggregation | None = Aggregation.ENSEMBLE  # None: the router's default
    expert_ids: tuple[tuple[str, ...], ...] | None = None
    weights: torch.Tensor | None = None  # [B, k] float32, rows sum to 1
    router: Router | None = None
    top_k: int | None = None
    merge: MergeOptions = field(default_factory=MergeOptions)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def explicit(
        cls,
        expert_ids: Sequence[Sequence[str]],
        weights: Sequence[Sequence[float]] | torch.Tensor | None = None,
        aggregation: Aggregation | str = Aggregation.ENSEMBLE,
        merge: MergeOptions | None = None,
        signed: bool = False,
    ) -> RoutingPlan:
        """Per input the chosen experts; ``weights`` default to uniform.

        ``signed``: the weights are a composition's, used as given (finite, any sign, not
        normalised); only ``merge_linear`` can apply them exactly.
        """
        ids = tuple(tuple(row) for row in expert_ids)
        if weights is None:
            w = torch.tensor([[1.0] * len(row) for row in ids]) if ids else torch.empty(0, 0)
        else:
            try:
                w = torch.as_tensor(weights, dtype=torch.float32)
            except (TypeError, ValueError) as exc:
                raise InvalidPlan(f"routing weights are not a [B, k] matrix: {exc}") from None
        aggregation = _aggregation(aggregation)
        if signed and aggregation is not Aggregation.MERGE_LINEAR:
            raise InvalidPlan(f"signed weights need merge_linear, not {aggregation.value}")
        plan = cls(
            aggregation=aggregation,
            expert_ids=ids,
            weights=_normalise(ids, w, signed),
            merge=merge or MergeOptions(),
        )
        plan.merge.validate()
        return plan

    @classmethod
    def from_decision(
        cls,
        router: Router,
        decision: RoutingDecision,
        aggregation: Aggregation | str = Aggregation.ENSEMBLE,
        merge: MergeOptions | None = None,
    ) -> RoutingPlan:
        """An example-level ``decision`` (indices into ``router.expert_ids``) as a plan."""
        ids = [[router.expert_ids[int(i)] for i in row] for row in decision.indices.tolist()]
        return cls.explicit(ids, decision.weights.float(), aggregation, merge)

    @classmethod
    def routed(
        cls,
        router: Router | None = None,
        top_k: int | None = None,
        aggregation: Aggregation | str | None = None,
        merge: MergeOptions | None = None,
    ) -> RoutingPlan:
        """Let the engine route: ``router`` (``None``: the active one) with ``top_k``.

        ``aggregation`` ``None`` picks the router's default: ensembling for example-level
        routers, module mixing for token-level ones.
        """
        if top_k is not None and (
            not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1
        ):
            raise InvalidTopK(f"top_k must be an integer >= 1, got {top_k!r}")
        plan = cls(
            aggregation=None if aggregation is None else _aggregation(aggregation),
            router=router,
            top_k=top_k,
            merge=merge or MergeOptions(),
        )
        plan.merge.validate()
        return plan

    # -- inspection ---------------------------------------------------------------------------
    @property
    def is_explicit(self) -> bool:
        """Whether the plan names each input's experts and weights itself, rather than leaving them
        to a router."""
        return self.expert_ids is not None

    @property
    def k(self) -> int:
        """Experts per input of an explicit plan."""
        if self.weights is None:
            raise ValueError("a routed plan has no fixed k before routing")
        return int(self.weights.shape[1])

    def expert_rows(self) -> list[tuple[tuple[str, ...], list[float]]]:
        """Per input of an explicit plan: its expert ids and their weights, ``[B]`` pairs."""
        if self.expert_ids is None or self.weights is None:
            raise ValueError("only explicit plans have rows")
        return list(zip(self.expert_ids, self.weights.tolist(), strict=True))

    def distinct_experts(self) -> list[str]:
        """Every expert an explicit plan names, once, in order of first use."""
        return list(dict.fromkeys(e for ids in self.expert_ids or () for e in ids))

    def check_batch(self, batch_size: int) -> None:
        """Raise :class:`InvalidPlan` unless an explicit plan has one row per input."""
        if self.is_explicit and len(self.expert_ids or ()) != batch_size:
            raise InvalidPlan(
                f"the plan routes {len(self.expert_ids or ())} inputs but {batch_size} were given"
            )

    def rows(self, index: Sequence[int]) -> RoutingPlan:
        """The explicit plan restricted to the inputs ``index`` (in that order)."""
        if not self.is_explicit or self.weights is None or self.expert_ids is None:
            raise ValueError("only explicit plans have rows")
        ids = tuple(self.expert_ids[i] for i in index)
        rows = torch.as_tensor(list(index), dtype=torch.long)
        return RoutingPlan(self.aggregation, ids, self.weights[rows], merge=self.merge)

    def batch_key(self) -> tuple[object, ...]:
        """Plans with equal keys can run as one batch (see ``InferenceEngine.predict_many``)."""
        if self.is_explicit:
            return ("explicit", self.aggregation, self.k, self.merge)
        return ("routed", id(self.router), self.top_k, self.aggregation, self.merge)

    @staticmethod
    def concat(plans: Sequence[RoutingPlan]) -> RoutingPlan:
        """Stack explicit plans with equal :meth:`batch_key` into one."""
        first = plans[0]
        if any(p.batch_key() != first.batch_key() or not p.is_explicit for p in plans):
            raise ValueError("only explicit plans with equal batch keys can be concatenated")
        ids = tuple(row for p in plans for row in (p.expert_ids or ()))
        weights = torch.cat([p.weights for p in plans if p.weights is not None], dim=0)
        return RoutingPlan(first.aggregation, ids, weights, merge=first.merge)


@dataclass(frozen=True)
class InferenceRequest:
    """One caller's inputs for ``InferenceEngine.predict_many`` (e.g. one Predict RPC)."""

    texts: Sequence[str]
    plan: RoutingPlan | None = None  # None: the active router with its defaults
    max_new_tokens: int | None = None  # causal LM only


def _aggregation(value: Aggregation | str) -> Aggregation:
    try:
        return Aggregation(value)
    except ValueError:
        known = ", ".join(a.value for a in Aggregation)
        raise InvalidPlan(f"unknown aggregation {value!r} (known: {known})") from None


def _normalise(
    ids: tuple[tuple[str, ...], ...], weights: torch.Tensor, signed: bool = False
) -> torch.Tensor:
    """Check ``ids`` [B][k] against ``weights`` [B, k]; rows rescaled to sum 1 unless signed."""
    if not ids:
        return torch.empty(0, 0)
    k = len(ids[0])
    if k < 1:
        raise InvalidTopK("top_k must be >= 1: every input needs at least one expert")
    for row in ids:
        if len(row) != k:
            raise InvalidPlan("every input must name the same number of experts")
        if len(set(row)) != k:
            raise InvalidPlan(f"an input names the same expert twice: {list(row)}")
        for expert_id in row:
            if not isinstance(expert_id, str) or not expert_id:
                raise InvalidPlan(f"expert ids must be non-empty strings, got {expert_id!r}")
    if tuple(weights.shape) != (len(ids), k):
        raise InvalidPlan(f"weights have shape {list(weights.shape)}, expected [{len(ids)}, {k}]")
    if signed:
        if not torch.isfinite(weights).all():
            raise InvalidPlan("composition weights must be finite")
        return weights.contiguous()
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise InvalidPlan("routing weights must be finite and non-negative")
    totals = weights.sum(dim=1, keepdim=True)  # [B, 1]
    if (totals <= 0).any():
        raise InvalidPlan("every input needs a positive total routing weight")
    return (weights / totals).contiguous()
