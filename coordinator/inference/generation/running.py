"""A request in the running batch: its rows, routing, resources and progress.

:func:`bind` turns a routed request into a :class:`Running` member of the batch: one row, or
``k`` adjacent rows for an output ensemble (the weighted mixture of its experts' next-token
distributions, ``log sum_j w_j p_j``); per row the bank slots and weights of example routing
(one expert, an exact linear merge, a temporary TIES/DARE slot, or the base model), or the token
router whose every decision the bank asks for (:mod:`.batch_routing`). Everything the request
holds (pinned experts, a temporary merge slot) is in its ``resources``, closed when it leaves.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from moerge.coordinator.inference.errors import InputTooLong, InvalidPlan
from moerge.coordinator.inference.generation.batch_routing import TokenRouting
from moerge.coordinator.inference.generation.detokenizer import StreamingDetokenizer
from moerge.coordinator.inference.generation.requests import GenerationRequest
from moerge.coordinator.inference.generation.sampling import BatchSampler
from moerge.coordinator.inference.plan import Aggregation, RoutingPlan
from moerge.coordinator.inference.results import ExpertWeight

if TYPE_CHECKING:
    from moerge.coordinator.inference.engine import InferenceEngine


@dataclass
class Running:
    """A request in the running batch, with everything freed when it leaves."""

    request: GenerationRequest
    rows: int  # k for an output ensemble, else 1
    slots: list[list[int]]  # per row (example routing); [] for token routing
    weights: list[list[float]]
    mix: torch.Tensor | None  # [k] log-weights of an output ensemble
    token: TokenRouting | None
    experts: tuple[ExpertWeight, ...]
    aggregation: str
    prompt_ids: list[int]
    resources: ExitStack
    detokenizer: StreamingDetokenizer
    generator: torch.Generator | None
    row: int = -1  # first of its rows in the KV buffers (KVRows), once admitted
    generated: list[int] = field(default_factory=list)
    logprob_sum: float = 0.0
    first_token_at: float | None = None
    usage: torch.Tensor | None = None  # [E] token-routing weight received (token routing)

    def experts_used(self) -> tuple[ExpertWeight, ...]:
        """The experts this request was routed to: its plan's, or for token routing the mean
        routing weight each expert received over the request's tokens (largest first)."""
        if self.token is None or self.usage is None:
            return self.experts
        usage = self.usage.cpu()
        total = float(usage.sum())
        if total <= 0:
            return ()
        mean = (usage / total).tolist()
        ids = self.token.router.expert_ids
        order = sorted(range(len(mean)), key=mean.__getitem__, reverse=True)
        return tuple(ExpertWeight(ids[i], mean[i]) for i in order if mean[i] > 0)


def bind(
    engine: InferenceEngine,
    sampler: BatchSampler,
    request: GenerationRequest,
    plan: RoutingPlan,
    resources: ExitStack,
    prompt_ids: list[int],
) -> Running:
    """Bind ``request``, routed by ``plan``, to the bank: its rows, slots or token router, and
    the resources freed when it leaves (pinned experts, a temporary merge slot)."""
    aggregation = plan.aggregation or Aggregation.ENSEMBLE
    seed = request.sampling.seed
    common: dict[str, Any] = {
        "request": request,
        "prompt_ids": prompt_ids,
        "resources": resources,
        "aggregation": aggregation.value,
        "detokenizer": StreamingDetokenizer(engine.tokenizer, request.sampling.stop),
        "generator": None if seed is None else sampler.new_generator(seed),
    }
    if aggregation is Aggregation.MODULE_MIX:
        router = plan.router
        assert router is not None
        loaded = resources.enter_context(engine.cache.acquire(router.expert_ids))
        table = torch.tensor(
            [loaded[e].slot for e in router.expert_ids], dtype=torch.long, device=engine.device
        )
        token = TokenRouting(router, plan.top_k, table, engine.router_modules(router))
        return Running(rows=1, slots=[], weights=[], mix=None, token=token, experts=(), **common)
    assert plan.expert_ids is not None and plan.weights is not None
    ids, weights = plan.expert_ids[0], [float(w) for w in plan.weights[0].tolist()]
    experts = tuple(ExpertWeight(e, w) for e, w in zip(ids, weights, strict=True))
    base: dict[str, Any] = {"token": None, "experts": experts}
    if not ids:  # the base router: no expert
        return Running(rows=1, slots=[[-1]], weights=[[0.0]], mix=None, **base, **common)
    loaded = resources.enter_context(engine.cache.acquire(list(ids)))
    slots = [loaded[e].slot for e in ids]
    if aggregation is Aggregation.ENSEMBLE and len(ids) > 1:
        mix = torch.tensor(weights, device=engine.device).clamp_min(1e-30).log()
        return Running(
            rows=len(ids),
            slots=[[s] for s in slots],
            weights=[[1.0]] * len(ids),
            mix=mix,
            **base,
            **common,
        )
    if aggregation in (Aggregation.ENSEMBLE, Aggregation.MERGE_LINEAR):
        return Running(rows=1, slots=[slots], weights=[weights], mix=None, **base, **common)
    method = aggregation.merge_method
    if method is None:
        raise InvalidPlan(f"aggregation {aggregation.value} cannot serve generation")
    temp_id, slot = engine.add_merged_slot(ids, weights, method, plan.merge, loaded)
    resources.callback(engine.bank.remove_expert, temp_id)
    return Running(rows=1, slots=[[slot]], weights=[[1.0]], mix=None, **base, **common)


def routing_embeddings(
    engine: InferenceEngine, requests: list[GenerationRequest]
) -> dict[int, torch.Tensor]:
    """One batched embedding pass for every request an example-level router will route
    (``{index: [1, H]}``), instead of one base-model forward per admitted request."""
    wanted = []
    for i, request in enumerate(requests):
        plan = request.plan or RoutingPlan.routed()
        router = plan.router if plan.router is not None else engine.router
        if not plan.is_explicit and router is not None and router.granularity == "example":
            wanted.append(i)
    if not wanted:
        return {}
    try:
        pooled = engine.embed_batch([requests[i].routing_text for i in wanted])  # [n, H]
    except Exception:  # each request meets its own error when routed alone
        return {}
    return {i: pooled[j : j + 1] for j, i in enumerate(wanted)}


def prepare(
    engine: InferenceEngine,
    sampler: BatchSampler,
    request: GenerationRequest,
    embedding: torch.Tensor | None,
    max_positions: int,
) -> Running:
    """Tokenize and route one request and bind it (:func:`bind`); raises on a bad request
    (an empty or too long prompt, a budget past the model's ``max_positions``, a bad plan)."""
    ids = engine.tokenizer(
        request.prompt, add_special_tokens=not request.chat, return_token_type_ids=False
    )["input_ids"]
    if not ids:
        raise InputTooLong("the prompt is empty after tokenization")
    if len(ids) > engine.max_length:
        raise InputTooLong(f"the prompt has {len(ids)} tokens; the limit is {engine.max_length}")
    budget = request.sampling.max_new_tokens
    if max_positions and len(ids) + budget > max_positions:
        raise InputTooLong(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({budget}) exceeds the model's "
            f"{max_positions} positions"
        )
    asked = request.plan or RoutingPlan.routed()
    router = asked.router if asked.router is not None else engine.router
    if router is not None:  # size the bank for the router once, not by doubling under load
        engine.cache.reserve_for(len(router.expert_ids))
    plan = engine.resolve_plan([request.routing_text], asked, embedding)
    resources = ExitStack()
    try:
        return bind(engine, sampler, request, plan, resources, ids)
    except BaseException:
        resources.close()
        raise
