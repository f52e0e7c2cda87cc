"""Compose and ListCompositions: few-shot composition at the coordinator (grpc-free).

``Compose`` checks the request, picks the candidate experts (the request's, or every active expert
whose labels cover the examples' labels; for a causal LM every active expert), runs
:func:`~moerge.router_training.composition.search_weights` on a worker thread with the engine's loss
(:mod:`moerge.coordinator.inference.composition_objective`), streams a progress event after every
evaluation, then stores the weights as the next version of the name and sends it. The examples live
only in this call unless ``keep_examples``. If the caller goes away the search is cancelled and
nothing is stored. One search runs at a time (it shares the engine's worker with Predict); a second
caller gets RESOURCE_EXHAUSTED rather than an unbounded wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import AsyncGenerator

from moerge.coordinator.inference.composition_objective import classification_loss, generation_loss
from moerge.coordinator.inference.service import expert_names
from moerge.coordinator.rpc.convert import actor_of
from moerge.coordinator.state import CoordinatorState
from moerge.refusals import FailedPrecondition, InvalidArgument, ResourceExhausted
from moerge.router_training.composition import (
    CompositionConfig,
    SearchProgress,
    SearchResult,
    check_examples,
    search_weights,
)
from moerge.storage.compositions import CompositionStore
from moerge.storage.records import CompositionInfo, ExpertInfo, Principal
from moerge.storage.validation import check_name
from moerge.v1 import common_pb2, inference_pb2

_busy = threading.Lock()  # one search per coordinator process


def composition_message(info: CompositionInfo, names: dict[str, str]) -> inference_pb2.Composition:
    """A stored composition as its protobuf message, experts named when ``names`` knows them."""
    search = info.search
    return inference_pb2.Composition(
        name=info.name,
        version=info.version,
        experts=[
            common_pb2.ExpertWeight(expert_id=e, expert_name=names.get(e, ""), weight=w)
            for e, w in zip(info.expert_ids, info.weights, strict=True)
        ],
        label_names=list(info.label_names),
        loss=float(search.get("loss", 0.0)),
        start_loss=float(search.get("start_loss", 0.0)),
        evaluations=int(search.get("evaluations", 0)),
        elapsed_s=float(search.get("elapsed_s", 0.0)),
        stopped_by=str(search.get("stopped_by", "")),
        example_count=int(search.get("example_count", 0)),
        examples_kept=bool(info.examples),
        created_by=info.created_by,
        created_at=info.created_at.isoformat(),
    )


def _config(request: inference_pb2.ComposeRequest) -> CompositionConfig:
    config = CompositionConfig(
        budget=request.budget or CompositionConfig.budget,
        time_limit_s=request.time_limit_s or CompositionConfig.time_limit_s,
        l1=request.l1 if request.HasField("l1") else CompositionConfig.l1,
        seed=request.seed,
    )
    try:
        config.validate()
    except ValueError as exc:
        raise InvalidArgument("compose", str(exc)) from None
    return config


def _active(state: CoordinatorState, requested: list[str]) -> dict[str, ExpertInfo]:
    """The active experts by id; refused when a requested one is unknown or not active."""
    active = {e.id: e for e in state.registry.active_experts()}
    for expert_id in requested:
        if expert_id not in active:
            info = state.registry.get_expert(expert_id)  # NotFound for unknown ids
            raise FailedPrecondition(f"expert {expert_id} is {info.state}, not active")
    return active


def _any_experts(
    state: CoordinatorState, requested: list[str]
) -> tuple[list[str], tuple[str, ...]]:
    """Causal LM: the requested experts (each must be active), else every active expert."""
    active = _active(state, requested)
    if not active:
        raise FailedPrecondition("no active experts are registered yet")
    return (requested or sorted(active)), ()


def _candidates(
    state: CoordinatorState, requested: list[str], labels: set[str]
) -> tuple[list[str], tuple[str, ...]]:
    """The experts to compose and their shared label names.

    Merging heads is only meaningful between experts that answer the same question, so every
    candidate must have the same label set, and it must hold every example's label. With no
    ``requested`` ids the candidates are the active experts whose labels cover the examples'
    and whose label set is the most common among those.
    """
    active = _active(state, requested)
    if requested:
        chosen = [active[e] for e in requested]
    else:
        covering = [e for e in active.values() if labels <= set(e.label_names)]
        if not covering:
            raise FailedPrecondition(
                f"no active expert's labels cover the examples' labels {sorted(labels)}"
            )
        sets = Counter(frozenset(e.label_names) for e in covering)
        common = max(sets, key=lambda s: (sets[s], sorted(s)))
        chosen = sorted(
            (e for e in covering if frozenset(e.label_names) == common), key=lambda e: e.id
        )
    label_sets = {frozenset(e.label_names) for e in chosen}
    if len(label_sets) > 1:
        raise FailedPrecondition(
            "the experts of a composition must share one label set; these do not "
            "(choose experts of the same output space)"
        )
    names = tuple(chosen[0].label_names)
    unknown = sorted(labels - set(names))
    if unknown:
        raise FailedPrecondition(f"labels {unknown[:10]} are not among the experts' {list(names)}")
    return [e.id for e in chosen], names


async def compose(
    request: inference_pb2.ComposeRequest, state: CoordinatorState, principal: Principal
) -> AsyncGenerator[inference_pb2.ComposeResponse, None]:
    """Progress events, then the stored composition (see the module docstring)."""
    causal_lm = state.config.task_type == "causal_lm"
    texts = [e.text for e in request.examples]
    labels = [e.label for e in request.examples]
    try:
        check_examples(texts, labels)
    except ValueError as exc:
        raise InvalidArgument("examples", str(exc)) from None
    config = _config(request)
    if len(set(request.expert_ids)) != len(request.expert_ids):
        raise InvalidArgument("expert_ids", "an expert is named twice")
    store = CompositionStore(state.registry)
    name = check_name("name", request.name)  # before the search, not only when storing
    inference = await state.inference_service()
    inference.check_inputs(texts)
    inference.engine.check_texts(texts)  # refused now, not at the search's first step
    if causal_lm:  # answers are text: every (requested or active) expert may take part
        experts, label_names = await asyncio.to_thread(
            _any_experts, state, list(request.expert_ids)
        )
    else:
        experts, label_names = await asyncio.to_thread(
            _candidates, state, list(request.expert_ids), set(labels)
        )
    build_loss = generation_loss if causal_lm else classification_loss
    if not _busy.acquire(blocking=False):
        raise ResourceExhausted("a composition search is already running; try again later")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[SearchProgress | SearchResult | BaseException] = asyncio.Queue()
    stop = threading.Event()

    def run() -> None:  # the slot is held exactly as long as this search runs
        try:
            loss = build_loss(inference.engine, experts, texts, labels)
            result = search_weights(
                loss,
                len(experts),
                config,
                on_progress=lambda p: loop.call_soon_threadsafe(events.put_nowait, p),
                cancelled=stop.is_set,
            )
            loop.call_soon_threadsafe(events.put_nowait, result)
        except BaseException as exc:  # handed to the caller's stream
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
                loop.call_soon_threadsafe(events.put_nowait, exc)
        finally:
            _busy.release()

    try:
        loop.run_in_executor(None, run)
    except BaseException:
        _busy.release()
        raise
    try:
        while not isinstance(event := await events.get(), SearchResult):
            if isinstance(event, BaseException):
                raise event
            yield inference_pb2.ComposeResponse(
                progress=inference_pb2.ComposeProgress(
                    evaluations=event.evaluations,
                    budget=event.budget,
                    best_loss=event.best_loss,
                    elapsed_s=event.elapsed_s,
                )
            )
    finally:
        stop.set()  # the caller left or the search failed: stop it, store nothing
    search = {
        "config": {
            "budget": config.budget,
            "time_limit_s": config.time_limit_s,
            "l1": config.l1,
            "optimizer": config.optimizer,
            "seed": config.seed,
        },
        "example_count": len(texts),
        "loss": event.loss,
        "start_loss": event.start_loss,
        "objective": event.objective,
        "evaluations": event.evaluations,
        "elapsed_s": event.elapsed_s,
        "stopped_by": event.stopped_by,
    }
    info = await asyncio.to_thread(
        store.create,
        actor_of(principal),
        name,
        experts,
        event.weights,
        label_names,
        search,
        list(zip(texts, labels, strict=True)) if request.keep_examples else None,
    )
    names = await inference.expert_names(info.expert_ids)
    yield inference_pb2.ComposeResponse(composition=composition_message(info, names))


async def list_compositions(
    request: inference_pb2.ListCompositionsRequest, state: CoordinatorState, principal: Principal
) -> inference_pb2.ListCompositionsResponse:
    """The stored compositions (all, or one name's versions), with their experts' names."""
    page = await asyncio.to_thread(CompositionStore(state.registry).list, request.name)
    ids = [e for c in page.items for e in c.expert_ids]
    names = await asyncio.to_thread(expert_names, state.registry, ids)
    return inference_pb2.ListCompositionsResponse(
        compositions=[composition_message(c, names) for c in page.items]
    )
