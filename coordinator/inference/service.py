"""Routed predictions at the coordinator: pick the router, restrict it, batch, call the engine.

The engine (:mod:`moerge.coordinator.inference`) knows models and adapters; this module knows the
registry: which experts are active, which router version a request asks for, and what to do
when there is no router yet. Rules (documented in ``docs/inference.md``):

* A request may name a router version, or a method (its newest ready version), else the active
  version is used. With no trained router at all, a centroid router is fitted on the fly from
  the active experts' uploaded statistics and the response says so in ``note``.
* Only ACTIVE experts receive traffic: when a router was fitted over experts that have since been
  quarantined or retired (or the request restricts ``expert_ids``), the router is wrapped by
  :class:`RestrictedRouter`, which renormalises its softmax over the allowed experts only.

The request path reads no database when nothing changed: the active experts and the router each
request resolves to are kept in
:class:`~moerge.coordinator.services.registry_cache.GenerationCache` maps, dropped on any
registry write (a quarantine is obeyed by the next request) and after
:data:`~moerge.coordinator.services.registry_cache.MAX_AGE_SECONDS`. Requests that resolve alike
share one router object, so the micro-batcher runs them as one engine batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from moerge.coordinator.config import CoordinatorConfig
from moerge.coordinator.inference.batcher import MicroBatcher
from moerge.coordinator.inference.composition_objective import composition_plan
from moerge.coordinator.inference.device import resolve_placement
from moerge.coordinator.inference.engine import (
    InferenceEngine,
    InferenceRequest,
    checked_task_type,
)
from moerge.coordinator.inference.errors import InputTooLong, InvalidTopK
from moerge.coordinator.inference.plan import Aggregation, RoutingPlan
from moerge.coordinator.inference.results import ExamplePrediction
from moerge.coordinator.services.expert_store import ExpertStore
from moerge.coordinator.services.registry_cache import GenerationCache
from moerge.coordinator.services.routers import LoadedRouter, RouterService
from moerge.refusals import FailedPrecondition, InvalidArgument, NotFound
from moerge.router_training.base import ExpertRecord, Router, RouterConfig, RoutingDecision
from moerge.router_training.fitting import fit_router
from moerge.router_training.methods import available_methods, get_router_class
from moerge.storage.compositions import CompositionStore
from moerge.storage.records import CompositionInfo, ExpertInfo
from moerge.storage.registry import Registry

log = logging.getLogger(__name__)

FALLBACK_METHOD = "centroid"


class RestrictedRouter(Router):
    """A fitted router limited to a subset of its experts (softmax renormalised over them).

    For softmax-style weights ``p_i = exp(s_i) / sum_j exp(s_j)``, renormalising over a subset S
    gives ``exp(s_i) / sum_{j in S} exp(s_j)``: exactly the router fitted over S would weigh them.
    """

    def __init__(self, inner: Router, allowed: Sequence[str]) -> None:
        self.inner = inner
        # Router declares these per class (ClassVar); a restriction takes the identity of the
        # router it wraps, which only an instance attribute can do, hence the ignores.
        self.method = inner.method  # type: ignore[misc]
        self.granularity = inner.granularity  # type: ignore[misc]
        self.config = inner.config
        self.expert_ids = list(inner.expert_ids)
        allowed_set = set(allowed)
        self.mask = torch.tensor([e in allowed_set for e in self.expert_ids])  # [E] bool
        self.allowed_count = int(self.mask.sum())
        #: the one expert it may choose, if only one: routing that needs no embedding
        self.only_expert = (
            next(e for e in self.expert_ids if e in allowed_set)
            if self.allowed_count == 1
            else None
        )

    @classmethod
    def fit(cls, experts: Sequence[ExpertRecord], config: RouterConfig) -> Router:
        """Refused: a restricted router only wraps a fitted one."""
        raise TypeError("a RestrictedRouter wraps a fitted router; it is never fitted")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The wrapped router's tensors."""
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load the wrapped router's tensors."""
        self.inner.load_state_dict(state)

    @property
    def modules(self) -> list[str]:
        """The wrapped token router's modules."""
        return self.inner.modules

    def _restrict(self, full: RoutingDecision, k: int) -> RoutingDecision:
        rows = full.indices.shape[0]
        dense = torch.zeros(rows, self.num_experts)  # [R, E]
        dense.scatter_(1, full.indices, full.weights.float())
        dense[:, ~self.mask] = 0.0
        weights, indices = torch.topk(dense, k, dim=-1)  # [R, k]
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return RoutingDecision(indices=indices, weights=weights)

    def _k(self, top_k: int | None) -> int:
        """``top_k`` (``None``: the config's), at most the allowed experts; a config without
        one (the uniform router's "every expert") gives every allowed expert.

        The engine has checked ``1 <= top_k <= num_experts`` (``planning.resolve_plan``); only
        the bound below that, the allowed experts, is this router's to check.
        """
        k = self.config.top_k if top_k is None else top_k
        if k is None:
            return self.allowed_count
        if k > self.allowed_count:
            raise InvalidTopK(f"top_k must be between 1 and {self.allowed_count}, got {k}")
        return k

    def route_examples(self, embeddings: torch.Tensor, top_k: int | None = None) -> RoutingDecision:
        """The wrapped router's decision over every expert, restricted to the allowed ones and cut
        to ``top_k``."""
        k = self._k(top_k)
        return self._restrict(self.inner.route_examples(embeddings, self.num_experts), k)

    def route_tokens(
        self, module: str, hidden: torch.Tensor, top_k: int | None = None
    ) -> RoutingDecision:
        """The wrapped router's per-token decision, restricted to the allowed experts and cut to
        ``top_k``."""
        k = self._k(top_k)
        return self._restrict(self.inner.route_tokens(module, hidden, self.num_experts), k)


@dataclass(frozen=True)
class RemoteRequest:
    """One Predict as an engine process receives it (``predict_process``): plain fields.

    Routed: ``router_version`` is the version the front resolved (0: no router trained, the
    on-the-fly fallback), restricted to ``expert_filter`` and the active experts. A stored
    composition: ``composition`` holds its experts and signed weights; no router.
    """

    texts: list[str]
    router_version: int = 0
    expert_filter: tuple[str, ...] = ()
    top_k: int = 0
    aggregation: str | None = None  # an Aggregation value
    max_new_tokens: int = 0
    composition: tuple[tuple[str, ...], tuple[float, ...]] | None = None


class RemoteEngine(Protocol):
    """Where Predict's batches run when not in this process
    (:class:`~moerge.coordinator.inference.engine_process.EngineProcess`)."""

    def predict_many(
        self, requests: Sequence[RemoteRequest]
    ) -> list[list[ExamplePrediction] | BaseException]:
        """One batch: each request's predictions or its error, in order."""
        ...

    def cache_stats(self) -> dict[str, int]:
        """Its adapter cache's ``AdapterCache.stats``."""
        ...

    def close(self) -> None:
        """Stop it."""
        ...


@dataclass(frozen=True)
class Chosen:
    """The router a request will use, and what to tell the caller about it.

    A generation pinned to a few-shot composition has no router: ``router`` is ``None`` and
    ``method`` says ``composition``.
    """

    router: Router | None
    version: int
    note: str

    @property
    def method(self) -> str:
        """The routing method that served, or ``composition`` for a stored composition."""
        return self.router.method if self.router is not None else "composition"


class InferenceService:
    """Owns the engine and the micro-batcher; created on the first Predict/Route."""

    def __init__(
        self,
        config: CoordinatorConfig,
        registry: Registry,
        experts: ExpertStore,
        routers: RouterService,
        generation: Callable[[], int] | None = None,
        engine_process: RemoteEngine | None = None,
    ) -> None:
        """``generation``: what the request-path caches are valid under (default: the
        registry's; the engine process adds the front's). ``engine_process``: where Predict's
        batches run instead of this process's engine (``predict_process``)."""
        self.config = config
        self.registry = registry
        self.experts = experts
        self.routers = routers
        generation = generation or registry.generation
        self.placement = resolve_placement(config.device, config.dtype)
        log.info("inference on %s", self.placement.description)
        self.engine = InferenceEngine(
            config.base_model,
            task_type=checked_task_type(config.task_type),
            target_modules=list(config.target_modules),
            max_rank=config.max_lora_rank,
            cache_bytes=config.adapter_cache_bytes,
            expert_loader=self._expert_folder,
            max_chars=config.max_input_chars,
            max_length=config.max_input_tokens,
            truncate=config.task_type == "classification",
            device=self.placement.device,
            dtype=self.placement.torch_dtype,
            max_new_tokens=config.max_new_tokens,
            generation_max_batch=config.generation_max_batch,
            generation_max_waiting=config.generation_max_waiting,
            generation_cuda_graphs=config.generation_cuda_graphs,
            generation_steps_per_sync=config.generation_steps_per_sync,
            generation_bgmv_kernels=config.generation_bgmv_kernels,
            generation_fused_rotary=config.generation_fused_rotary,
            traced_forwards=config.traced_forwards,
        )
        #: Predict's model in a process of its own (``predict_process``), else None
        self.engine_process = engine_process
        self.batcher: MicroBatcher[InferenceRequest | RemoteRequest, list[ExamplePrediction]] = (
            MicroBatcher(
                self.engine_process.predict_many,  # type: ignore[arg-type]
                max_wait_ms=config.batch_wait_ms,
                size_of=lambda request: len(request.texts),
            )
            if self.engine_process is not None
            else MicroBatcher(
                self.engine.predict_many,  # type: ignore[arg-type]
                max_wait_ms=config.batch_wait_ms,
                executor=self.engine.executor,
                size_of=lambda request: len(request.texts),
            )
        )
        self._fallback: tuple[str, Router] | None = None
        self._lock = threading.Lock()
        self._active: GenerationCache[dict[str, ExpertInfo]] = GenerationCache(generation)
        #: (method, version, expert filter, active router) -> the request's router
        self._chosen: GenerationCache[Chosen] = GenerationCache(generation)
        #: (composition name, version) -> the stored composition
        self._compositions: GenerationCache[CompositionInfo] = GenerationCache(generation)

    def _expert_folder(self, expert_id: str):
        return self.experts.folder(self.registry.get_expert(expert_id))

    async def aclose(self) -> None:
        """Stop the batcher and log how many requests each engine batch served."""
        await self.batcher.aclose()
        batches, items = self.batcher.batches, self.batcher.items
        log.info(
            "inference: served %d requests in %d engine batches (%.1f per batch)",
            items,
            batches,
            items / max(1, batches),
        )
        if self.engine_process is not None:
            await asyncio.to_thread(self.engine_process.close)
        await asyncio.to_thread(self.engine.close)

    def cache_stats(self) -> dict[str, int]:
        """The adapter caches' ``AdapterCache.stats``: this process's engine plus the engine
        process's, if Predict runs in one (each holds its own adapters and budget)."""
        stats = self.engine.cache.stats()
        if self.engine_process is not None:
            for key, value in self.engine_process.cache_stats().items():
                stats[key] = stats.get(key, 0) + value
        return stats

    # -- choosing a router --------------------------------------------------------------------
    def active_experts(self) -> dict[str, ExpertInfo]:
        """The ACTIVE experts by id, read from the registry only when it may have changed."""
        active = self._active.get_or_read(
            "active", lambda: {e.id: e for e in self.registry.active_experts()}
        )
        assert active is not None  # a dict, perhaps empty, is never None
        return active

    async def chosen(self, method: str, version: int, expert_filter: Sequence[str]) -> Chosen:
        """:meth:`choose`, remembered per request shape while the registry is unchanged.

        A hit costs no thread hop and returns the same router object as the last request of its
        shape, which is what lets the batcher put them in one engine call.
        """
        cached = self._chosen.get(self._chosen_key(method, version, expert_filter))
        if cached is not None:
            return cached
        return await asyncio.to_thread(self.chosen_now, method, version, expert_filter)

    def _chosen_key(self, method: str, version: int, expert_filter: Sequence[str]) -> tuple:
        return (method, version, tuple(expert_filter), id(self.routers.active))

    def chosen_now(self, method: str, version: int, expert_filter: Sequence[str]) -> Chosen:
        """:meth:`chosen` for a caller that may block on the database (the engine process)."""
        key = self._chosen_key(method, version, expert_filter)
        chosen = self._chosen.get(key)
        if chosen is None:
            generation = self._chosen.generation()
            chosen = self.choose(method, version, expert_filter)
            self._chosen.put(key, chosen, generation)
        return chosen

    def choose(self, method: str, version: int, expert_filter: Sequence[str]) -> Chosen:
        """Router by version, by method, active, or the on-the-fly fallback; then restricted."""
        active = self.active_experts()
        if not active:
            raise FailedPrecondition("no active experts are registered yet")
        for expert_id in expert_filter:
            if expert_id not in active:
                info = self.registry.get_expert(expert_id)  # NotFound for unknown ids
                raise FailedPrecondition(f"expert {expert_id} is {info.state}, not active")
        note = ""
        loaded: LoadedRouter | None
        if version:
            loaded = self.routers.get(version)
        elif method:
            loaded = self._newest(method)
        else:
            loaded = self.routers.active
        if loaded is None:
            router, number = self._fallback_router(active), 0
            note = (
                f"no router trained yet: routed with a {FALLBACK_METHOD} router fitted on the "
                f"fly over {len(active)} active experts"
            )
        else:
            router, number = loaded.router, loaded.version.version
        if router.evaluation_only:
            raise FailedPrecondition(f"router {router.method!r} is for evaluation only")
        if router.method == "base":
            return Chosen(router=router, version=number, note=note)  # no expert to restrict
        allowed = [
            e
            for e in router.expert_ids
            if e in active and (not expert_filter or e in expert_filter)
        ]
        if not allowed:
            raise FailedPrecondition(
                "none of the router's experts is active (or in expert_ids); train a new router"
            )
        if len(allowed) < router.num_experts:
            router = RestrictedRouter(router, allowed)
        return Chosen(router=router, version=number, note=note)

    def _newest(self, method: str) -> LoadedRouter:
        if method not in available_methods():
            raise InvalidArgument(
                "routing_method",
                f"unknown method {method!r}; known: {', '.join(available_methods())}",
            )
        if get_router_class(method).evaluation_only:
            raise FailedPrecondition(
                f"{method!r} is for evaluation only (it needs each example's source expert) "
                "and serves no Predict; `moerge demo` scores it"
            )
        page = self.registry.list_router_versions(page_size=50, method=method)
        for info in page.items:
            if info.status == "ready":
                return self.routers.get(info.version)
        raise FailedPrecondition(
            f"no trained router for method {method!r}; train one with "
            f"`moerge admin router train --method {method}`"
        )

    def _fallback_router(self, active: dict[str, ExpertInfo]) -> Router:
        key = ",".join(sorted(active))
        with self._lock:
            if self._fallback is None or self._fallback[0] != key:
                records = [self.experts.record(e) for e in active.values()]
                self._fallback = (key, fit_router(FALLBACK_METHOD, records, {}).router)
            return self._fallback[1]

    @staticmethod
    def _top_k(router: Router, requested: int) -> int | None:
        """The request's top_k; else the router's default, capped at the experts it may use."""
        if requested:
            return requested
        default = router.config.top_k
        available = getattr(router, "allowed_count", router.num_experts)
        if default is not None and default > available:
            return available
        return None

    # -- serving ------------------------------------------------------------------------------
    def check_inputs(self, inputs: Sequence[str]) -> None:
        """Refuse more inputs than one call may carry (``max_batch_inputs``).

        Everything else about the inputs (none at all, not strings, over ``max_input_chars``
        characters or ``max_input_tokens`` tokens), and ``top_k`` against the router and
        ``max_new_tokens``, is checked once, by the engine: it also serves in-process callers
        without this service (the composition search, benchmarks), so the checks live there.
        The count per call is an RPC limit the engine does not have.
        """
        if len(inputs) > self.config.max_batch_inputs:
            raise InputTooLong(
                f"inputs holds {len(inputs)} texts; at most {self.config.max_batch_inputs} per call"
            )

    async def predict(
        self,
        inputs: Sequence[str],
        method: str,
        version: int,
        expert_filter: Sequence[str],
        top_k: int,
        aggregation: Aggregation | None,
        max_new_tokens: int,
    ) -> tuple[list[ExamplePrediction], Chosen, float]:
        """Route, run and aggregate a batch of inputs through the batcher; the results, what served
        them and the latency."""
        started = time.perf_counter()
        self.check_inputs(inputs)
        chosen = await self.chosen(method, version, expert_filter)
        request: InferenceRequest | RemoteRequest
        if self.engine_process is not None:  # the engine process resolves the same version
            request = RemoteRequest(
                list(inputs),
                chosen.version,
                tuple(expert_filter),
                top_k,
                aggregation.value if aggregation is not None else None,
                max_new_tokens,
            )
        else:
            plan = self.request_plan(chosen.router, top_k, aggregation, len(inputs))
            request = InferenceRequest(list(inputs), plan, max_new_tokens or None)
        predictions = await self.batcher.submit(request)
        return predictions, chosen, (time.perf_counter() - started) * 1000

    @classmethod
    def request_plan(
        cls, router: Router | None, top_k: int, aggregation: Aggregation | None, inputs: int
    ) -> RoutingPlan:
        """The request's routed plan; explicit when its router can choose one expert only.

        A request restricted to one expert (``expert_ids``, or one active expert left of the
        router's) is routed to it with weight 1 whatever its embedding: its plan names that
        expert, so the engine neither embeds its texts nor asks the router, and runs it in the
        same forward as the batch's other requests of one expert each.
        """
        k = cls._top_k(router, top_k) if router is not None else None
        only = getattr(router, "only_expert", None)
        if (
            only is not None
            and router is not None
            and router.granularity == "example"
            and (k if k is not None else router.config.top_k) == 1
            and aggregation is not Aggregation.MODULE_MIX
        ):
            # the plan RoutingPlan.explicit would build, without re-checking a known-good row
            return RoutingPlan(
                aggregation or Aggregation.ENSEMBLE,
                expert_ids=((only,),) * inputs,
                weights=torch.ones(inputs, 1),
            )
        return RoutingPlan.routed(router, k, aggregation)

    async def predict_composition(
        self, inputs: Sequence[str], name: str, version: int, max_new_tokens: int
    ) -> tuple[list[ExamplePrediction], CompositionInfo, float]:
        """Serve a stored few-shot composition: its signed linear merge for every input."""
        started = time.perf_counter()
        self.check_inputs(inputs)
        info = await self.composition(name, version)
        request: InferenceRequest | RemoteRequest
        if self.engine_process is not None:
            composition = (tuple(info.expert_ids), tuple(info.weights))
            request = RemoteRequest(
                list(inputs), max_new_tokens=max_new_tokens, composition=composition
            )
        else:
            plan = composition_plan(info.expert_ids, info.weights, len(inputs))
            request = InferenceRequest(list(inputs), plan, max_new_tokens or None)
        predictions = await self.batcher.submit(request)
        return predictions, info, (time.perf_counter() - started) * 1000

    async def composition(self, name: str, version: int) -> CompositionInfo:
        """A stored composition (remembered while the registry is unchanged) whose experts
        are all still active."""
        key = (name, version)
        info = self._compositions.get(key)
        if info is None:
            generation = self.registry.generation()
            info = await asyncio.to_thread(CompositionStore(self.registry).get, name, version)
            self._compositions.put(key, info, generation)
        active = self.active_experts()
        inactive = [e for e in info.expert_ids if e not in active]
        if inactive:
            raise FailedPrecondition(
                f"composition {info.name} v{info.version} uses expert {inactive[0]}, which is "
                "no longer active; compose it again"
            )
        return info

    async def route(
        self,
        inputs: Sequence[str],
        method: str,
        version: int,
        expert_filter: Sequence[str],
        top_k: int,
    ) -> tuple[list[list[tuple[str, float]]], Chosen, float]:
        """The routing decision of each input, on the engine's thread, with what served it and
        the latency."""
        started = time.perf_counter()
        self.check_inputs(inputs)
        chosen = await self.chosen(method, version, expert_filter)
        router = chosen.router
        assert router is not None  # choose() always picks one; only a composition has none
        plan = RoutingPlan.routed(router, self._top_k(router, top_k))
        routed = await asyncio.get_running_loop().run_in_executor(  # straight to the model thread
            self.engine.executor, self.engine.route, list(inputs), plan
        )
        decisions = [[(w.expert_id, w.weight) for w in row] for row in routed]
        return decisions, chosen, (time.perf_counter() - started) * 1000

    async def expert_names(self, expert_ids: Sequence[str]) -> dict[str, str]:
        """``"name vN"`` per expert id: active experts from the cache, others from the registry."""
        active = self._active.get("active")
        if active is None:  # read off the event loop; experts routed to are normally active
            active = await asyncio.to_thread(self.active_experts)
        wanted = set(expert_ids)
        names = {e: f"{active[e].name} v{active[e].version}" for e in wanted if e in active}
        missing = [e for e in wanted if e not in names]
        if missing:
            names.update(await asyncio.to_thread(expert_names, self.registry, missing))
        return names


def expert_names(registry: Registry, expert_ids: Sequence[str]) -> dict[str, str]:
    """``name vN`` of each expert id, for responses; an id no longer in the registry gets an empty
    name."""
    names = {}
    for expert_id in set(expert_ids):
        try:
            info = registry.get_expert(expert_id)
            names[expert_id] = f"{info.name} v{info.version}"
        except NotFound:
            names[expert_id] = ""
    return names
