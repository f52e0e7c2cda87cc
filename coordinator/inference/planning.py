"""Plan resolution: a routed :class:`~.plan.RoutingPlan` becomes one the forward can run.

A request's plan is explicit (experts and weights per input) or routed (a router, or the
engine's active one). Before a forward, a routed plan is resolved with the router it names, or
the active router read once, so a router swapped meanwhile changes nothing for this batch:

* an **example-level** router routes the texts' embeddings (frozen base model, no expert,
  [B, H]) to ``top_k`` experts each: the plan becomes explicit, aggregated by ensembling unless
  the request asked for a merge;
* a **token-level** router decides inside every adapted module during the forward: the plan
  keeps its router and becomes ``module_mix`` (the only aggregation it can have);
* the ``base`` router chooses no expert: an explicit plan with k = 0.

:func:`route_together` resolves several requests' example-level plans with one embedding pass
over all their texts, so requests routed by different routers (e.g. restricted to different
experts) become explicit plans that the engine can run as one batch.

``top_k`` is checked here against the router it will be given to (``1 <= top_k <= E``): only
here is the router known. A router restricted to fewer experts than it indexes refuses a
``top_k`` beyond them itself (``inference_service.RestrictedRouter``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from moerge.coordinator.inference.errors import InvalidPlan, InvalidTopK
from moerge.coordinator.inference.plan import Aggregation, InferenceRequest, RoutingPlan
from moerge.router_training.base import Router

#: Texts -> their routing embeddings [B, H] (the frozen base model, no expert).
Embed = Callable[[list[str]], torch.Tensor]


def resolve_plan(
    texts: list[str],
    plan: RoutingPlan,
    active: Router | None,
    embed: Embed,
    embeddings: torch.Tensor | None = None,
) -> RoutingPlan:
    """An explicit plan for ``texts``, or a token-level one with its router bound.

    ``active`` serves plans that name no router. Example-level routers route ``embeddings``
    [B, H] when given, else ``embed(texts)``.
    """
    if plan.is_explicit:
        plan.check_batch(len(texts))
        if plan.aggregation is Aggregation.MODULE_MIX:
            raise InvalidPlan("module mixing needs a token-level router, not fixed experts")
        return plan
    router = plan.router if plan.router is not None else active
    if router is None:
        raise InvalidPlan("no router is active and the plan names none")
    k = plan.top_k  # None: the router's own default (validated by the router)
    if k is not None and not 1 <= k <= router.num_experts:
        raise InvalidTopK(f"top_k must be between 1 and {router.num_experts}, got {k}")
    if router.granularity == "token":
        if plan.aggregation not in (None, Aggregation.MODULE_MIX):
            raise InvalidPlan(
                f"router '{router.method}' routes tokens: only module_mix is possible, "
                f"not {plan.aggregation.value}"
            )
        return RoutingPlan(Aggregation.MODULE_MIX, router=router, top_k=k, merge=plan.merge)
    aggregation = plan.aggregation or Aggregation.ENSEMBLE
    if aggregation is Aggregation.MODULE_MIX:
        raise InvalidPlan(f"router '{router.method}' routes examples: module_mix needs tokens")
    decision = router.route_examples(embed(texts) if embeddings is None else embeddings, k)
    if decision.k == 0:  # the ``base`` router: no expert at all
        return RoutingPlan(
            aggregation,
            expert_ids=((),) * len(texts),
            weights=torch.empty(len(texts), 0),
            merge=plan.merge,
        )
    return RoutingPlan.from_decision(router, decision, aggregation, plan.merge)


def routes_examples(plan: RoutingPlan | None, active: Router | None) -> bool:
    """Whether ``plan`` (``None``: the active router's defaults) is routed per example."""
    plan = plan or RoutingPlan.routed()
    router = plan.router if plan.router is not None else active
    return (
        not plan.is_explicit
        and router is not None
        and router.granularity == "example"
        and plan.aggregation is not Aggregation.MODULE_MIX
    )


def route_together(
    requests: Sequence[InferenceRequest | BaseException],
    active: Router | None,
    embed: Embed,
) -> list[InferenceRequest | BaseException]:
    """Route all example-level routed requests with one embedding pass over their texts.

    Their plans become explicit, so requests routed by different routers share a batch key: one
    embedding pass and one forward per expert instead of both per router. ``requests`` hold
    checked texts, or the error that refused them (passed through). A request that fails to
    route gets its error in its place; the others are returned unchanged.
    """
    members = {
        i: r
        for i, r in enumerate(requests)
        if isinstance(r, InferenceRequest) and routes_examples(r.plan, active)
    }
    routed = list(requests)
    if len(members) < 2:
        return routed
    try:
        embeddings = embed([t for r in members.values() for t in r.texts])  # [sum B_i, H]
    except Exception:
        return routed  # each request meets its own error when run alone
    rows: dict[int, list[int]] = {}  # request -> its rows of ``embeddings``
    by_router: dict[tuple[object, ...], list[int]] = {}  # same router, top_k, aggregation
    offset = 0
    for i, request in members.items():
        rows[i] = list(range(offset, offset + len(request.texts)))
        offset += len(request.texts)
        plan = request.plan or RoutingPlan.routed()
        by_router.setdefault(plan.batch_key(), []).append(i)
    for group in by_router.values():
        # one routing call per router; its requests share its settings, hence its errors
        plan = members[group[0]].plan or RoutingPlan.routed()
        try:
            whole = resolve_plan(
                [t for i in group for t in members[i].texts],
                plan,
                active,
                embed,
                embeddings[[r for i in group for r in rows[i]]],
            )
        except Exception as exc:
            for i in group:
                routed[i] = exc
            continue
        start = 0
        for i in group:
            part = whole.rows(range(start, start + len(rows[i])))
            routed[i] = replace(members[i], plan=part)
            start += len(rows[i])
    return routed
