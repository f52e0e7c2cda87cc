"""ListModels: what a request may name, for every role that may call Predict (grpc-free).

Why a call of its own: a user with an inference-only API key must be able to find out which
experts, routing methods and compositions exist (to pin one, to resolve an id prefix, to score
routers with ``moerge evaluate``) without the admin's registry listings, which also show
quarantined experts, their reasons, files and router internals. This answers only what Predict
and Generate would serve anyway: the ACTIVE experts (public fields), the newest ready router
version of each servable method, the active router, and the newest version of each composition
whose experts are all active.
``GET /v1/models`` is built from the same answer (:mod:`moerge.coordinator.http.serving`).
"""

from __future__ import annotations

import asyncio

from google.protobuf.timestamp_pb2 import Timestamp

from moerge.coordinator.inference.service import expert_names
from moerge.coordinator.rpc.composition_handler import composition_message
from moerge.coordinator.state import CoordinatorState
from moerge.router_training.methods import available_methods, get_router_class
from moerge.storage.compositions import CompositionStore
from moerge.storage.records import CompositionInfo, ExpertInfo, Principal, RouterVersionInfo
from moerge.v1 import inference_pb2

ROUTER_PAGE = 1000  # router versions read per registry query


def active_experts(state: CoordinatorState) -> list[ExpertInfo]:
    """The active experts: from the inference service's cache once it runs, else the registry.

    Blocking (a registry read): call it in a worker thread.
    """
    if state.inference is not None:
        experts = list(state.inference.active_experts().values())
    else:
        experts = state.registry.active_experts()
    return sorted(experts, key=lambda e: (e.name, e.version, e.id))


def servable_routers(state: CoordinatorState) -> dict[str, RouterVersionInfo]:
    """Per method, its newest ready version: what ``routing_method=method`` is served by.

    Evaluation-only methods (the oracle needs each example's source) serve nothing and are left
    out, as are methods this coordinator no longer knows. Blocking: call it in a thread.
    """
    known = set(available_methods())
    newest: dict[str, RouterVersionInfo] = {}
    token: str | None = None
    while True:
        page = state.registry.list_router_versions(page_size=ROUTER_PAGE, page_token=token)
        for info in page.items:  # newest first: the first ready one of a method is its newest
            if info.status == "ready" and info.method in known and info.method not in newest:
                newest[info.method] = info
        token = page.next_page_token
        if not token:
            break
    return {
        method: info
        for method, info in sorted(newest.items())
        if not get_router_class(method).evaluation_only
    }


def servable_compositions(state: CoordinatorState, active: set[str]) -> list[CompositionInfo]:
    """The newest version of each composition name whose experts are all ``active`` (Predict
    refuses the others: "compose it again"), by name. Blocking: call it in a thread."""
    newest: dict[str, CompositionInfo] = {}
    for info in CompositionStore(state.registry).list().items:
        if info.name not in newest or info.version > newest[info.name].version:
            newest[info.name] = info
    return [newest[name] for name in sorted(newest) if set(newest[name].expert_ids) <= active]


def _served_expert(e: ExpertInfo) -> inference_pb2.ServedExpert:
    created = Timestamp()
    created.FromDatetime(e.created_at)
    return inference_pb2.ServedExpert(
        expert_id=e.id,
        name=e.name,
        version=e.version,
        task_name=e.task_name,
        task_type=e.task_type,
        label_names=list(e.label_names),
        contributor_id=e.contributor_id,
        created_at=created,
    )


def models(state: CoordinatorState) -> inference_pb2.ListModelsResponse:
    """The answer of ListModels. Blocking (registry reads): call it in a worker thread."""
    experts = active_experts(state)
    routers = servable_routers(state)
    active = state.registry.active_router_version()
    compositions = servable_compositions(state, {e.id for e in experts})
    names = expert_names(state.registry, [e for c in compositions for e in c.expert_ids])
    return inference_pb2.ListModelsResponse(
        experts=[_served_expert(e) for e in experts],
        routers=[
            inference_pb2.ServedRouter(method=m, version=v.version) for m, v in routers.items()
        ],
        active_router_version=active.version if active else 0,
        active_router_method=active.method if active else "",
        compositions=[composition_message(c, names) for c in compositions],
    )


async def list_models(
    request: inference_pb2.ListModelsRequest, state: CoordinatorState, principal: Principal
) -> inference_pb2.ListModelsResponse:
    """See the module docstring; the registry reads run on a worker thread."""
    return await asyncio.to_thread(models, state)
