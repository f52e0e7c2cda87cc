"""Router versions at the coordinator: fit off the event loop, store, swap atomically, roll back.

Every fit (manual, on an expert-set change, or periodic, as decided by
:class:`~moerge.router_training.policy.RetrainPolicy`) writes a new router version: its method,
parameters, experts, artifact blob, fit metrics and timings. Only a successful fit replaces the
active router, by swapping one reference, so Predict never waits on training and a failed fit leaves
the previous router serving. Quarantined and retired experts are never included, and experts that
fail the consistency checks (:mod:`moerge.coordinator.uploads.screening`) are quarantined first. A
scheduled refit trains the active router's method and parameters, so an admin's choice persists; the
configured ``router_method`` is used only while no router is active. A method that cannot serve
(evaluation only, or no expert for classification) is never activated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moerge.coordinator.services.expert_store import ExpertStore
from moerge.refusals import FailedPrecondition, InvalidArgument, NotFound
from moerge.router_training.base import Router, load_router
from moerge.router_training.fitting import FitResult, build_config, fit_router, routable_experts
from moerge.router_training.methods import available_methods, get_router_class
from moerge.router_training.policy import RetrainPolicy
from moerge.storage.blobstore import BlobStore
from moerge.storage.records import ExpertInfo, RouterVersionInfo
from moerge.storage.registry import Registry

if TYPE_CHECKING:  # flwr is imported only when a SuperLink is configured
    from moerge.coordinator.config import CoordinatorConfig
    from moerge.router_training.superlink import SuperLinkFederation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedRouter:
    """A router version with its loaded router, as served."""

    version: RouterVersionInfo
    router: Router


class RouterService:
    """Owns the active router and the cache of loaded router versions."""

    def __init__(
        self,
        registry: Registry,
        blobs: BlobStore,
        experts: ExpertStore,
        default_method: str,
        policy: RetrainPolicy | None = None,
    ) -> None:
        self.registry = registry
        self.blobs = blobs
        self.experts = experts
        self.default_method = default_method
        self.policy = policy
        self._active: LoadedRouter | None = None
        self._loaded: dict[int, LoadedRouter] = {}
        self._train_lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        #: Set by the coordinator: the active experts after consistency checks (which
        #: quarantine what they flag); None = every active expert.
        self.screen: Callable[[], list[ExpertInfo]] | None = None
        #: Flower SuperLink for ``federated`` rounds with real contributors (config ``superlink``)
        self.federation: SuperLinkFederation | None = None

    # -- reading ------------------------------------------------------------------------------
    @property
    def active(self) -> LoadedRouter | None:
        """The router that serves requests now, or None before the first fit."""
        return self._active

    def load_active(self) -> None:
        """Load the registry's active version (at start, and after a rollback)."""
        info = self.registry.active_router_version()
        self._active = self.get(info.version) if info else None

    def get(self, version: int) -> LoadedRouter:
        """A loaded router version (cached; artifacts are verified blobs)."""
        cached = self._loaded.get(version)
        if cached is not None:
            return cached
        info = self.registry.get_router_version(version)
        if info.status != "ready" or not info.artifact_sha256:
            raise FailedPrecondition(f"router version {version} is {info.status}, not ready")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "router.safetensors"
            path.write_bytes(self.blobs.read_bytes(info.artifact_sha256))
            loaded = LoadedRouter(version=info, router=load_router(path))
        self._loaded[version] = loaded
        return loaded

    # -- training -----------------------------------------------------------------------------
    def train(
        self,
        method: str | None,
        params: dict[str, object],
        actor: str,
        trigger: str = "manual",
        activate: bool = True,
    ) -> RouterVersionInfo:
        """Fit a router over the active experts and record it as a new version."""
        method = method or self.default_method
        if method not in available_methods():
            raise InvalidArgument(
                "method",
                f"unknown routing method {method!r}; known: {', '.join(available_methods())}",
            )
        if activate and get_router_class(method).evaluation_only:
            raise InvalidArgument(
                "method",
                f"{method!r} is for evaluation only and cannot serve; train it with no_activate",
            )
        try:  # bad parameters are refused before anything is recorded
            top_k = getattr(build_config(method, params), "top_k", None)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument("params_json", str(exc)) from None
        with self._train_lock:
            experts = self.screen() if self.screen else self.registry.active_experts()
            if not experts:
                raise FailedPrecondition("no active experts to route among")
            if activate and top_k == 0 and any(e.task_type == "classification" for e in experts):
                raise InvalidArgument(
                    "method",
                    f"{method!r} routes to no expert, but a classification Predict needs one "
                    "(the base model has no head); train it with no_activate",
                )
            # a default top_k is lowered to the number of experts by fit_router; one asked for
            # is refused here, before a version is recorded
            if isinstance(top_k, int) and "top_k" in (params or {}) and top_k > len(experts):
                raise InvalidArgument(
                    "params_json",
                    f"top_k={top_k} exceeds the number of active experts ({len(experts)})",
                )
            try:  # experts the method cannot learn from (adapter-only: no statistics) stay out
                records, skipped = routable_experts(
                    method, [self.experts.record(e) for e in experts]
                )
            except ValueError as exc:
                raise FailedPrecondition(str(exc)) from None
            if skipped:
                log.warning(
                    "router %s leaves out %d expert(s) it cannot learn from: %s",
                    method,
                    len(skipped),
                    "; ".join(f"{e} ({why})" for e, why in list(skipped.items())[:10]),
                )
            version = self.registry.create_router_version(
                actor, method, params, [r.expert_id for r in records], trigger
            )
            try:
                result = self._fit(method, records, params)
                blind: list[str] = getattr(result.router, "zero_vector_experts", list)()
                if blind:
                    log.warning(
                        "router %s knows nothing about %d expert(s): their %s zero (a LoRA "
                        "update of zero, e.g. training kept the linear probe's start): %s",
                        method,
                        len(blind),
                        "gates are" if method == "phatgoose" else "LoRA updates are",
                        ", ".join(blind[:10]),
                    )
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "router.safetensors"
                    result.router.save(path)
                    ref = self.blobs.put_file(path)
                metrics = {k: float(v) for k, v in result.metrics.items()}
                metrics["artifact_bytes"] = float(ref.size)
                metrics["skipped_experts"] = float(len(skipped))
                info = self.registry.complete_router_version(
                    version.version,
                    (ref.sha256, ref.size),
                    metrics,
                    result.fit_seconds,
                    activate=activate,
                )
            except Exception as exc:
                self.registry.fail_router_version(version.version, f"{type(exc).__name__}: {exc}")
                log.warning("router fit %s (v%d) failed: %s", method, version.version, exc)
                if isinstance(exc, ValueError):
                    raise InvalidArgument("params_json", str(exc)) from exc
                raise
            loaded = LoadedRouter(version=info, router=result.router)
            self._loaded[info.version] = loaded
            if activate:
                self._active = loaded
            return info

    def try_extend(self, actor: str = "system") -> RouterVersionInfo | None:
        """Add newly active experts to the active router without a refit, as a new version.

        Applies when the active router's method is incremental (``Router.incremental``, e.g.
        Arrow: a new expert's prototypes are computed, nobody else's) and experts were only
        added since it was fitted; returns None otherwise (the scheduler then refits as usual).
        The extended router serves from the moment it exists; its artifact is written and its
        version completed right after (a failure there puts the previous router back).
        """
        active = self._active
        if active is None or not active.router.incremental:
            return None
        with self._train_lock:
            if self._active is not active:  # a fit finished meanwhile: look again next tick
                return None
            experts = self.screen() if self.screen else self.registry.active_experts()
            known = set(active.router.expert_ids)
            if not known <= {e.id for e in experts}:
                return None  # an expert left: its prototypes must go, a refit is needed
            new = [e for e in experts if e.id not in known]
            if not new:
                return None
            started = time.perf_counter()
            router = active.router.extended([self.experts.record(e) for e in new])
            version = self.registry.create_router_version(
                actor,
                active.version.method,
                dict(active.version.params),
                list(router.expert_ids),
                "expert_added",
            )
            self._active = LoadedRouter(version=version, router=router)  # serves from now on
            served_after = time.perf_counter() - started
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "router.safetensors"
                    router.save(path)
                    ref = self.blobs.put_file(path)
                info = self.registry.complete_router_version(
                    version.version,
                    (ref.sha256, ref.size),
                    {
                        "artifact_bytes": float(ref.size),
                        "added_experts": float(len(new)),
                        "serving_after_seconds": served_after,
                    },
                    time.perf_counter() - started,
                    activate=True,
                )
            except Exception as exc:
                self._active = active
                self.registry.fail_router_version(version.version, f"{type(exc).__name__}: {exc}")
                raise
            loaded = LoadedRouter(version=info, router=router)
            self._loaded[info.version] = loaded
            self._active = loaded
            log.info(
                "router v%d: %s extended by %d expert(s), serving after %.3f s",
                info.version,
                info.method,
                len(new),
                served_after,
            )
            return info

    def _fit(self, method: str, records: list, params: dict[str, object]) -> FitResult:
        """``federated`` rounds run over the SuperLink's SuperNodes when one is configured
        (unless ``params["backend"]`` asks for simulated contributors); all else fits here."""
        superlink_rounds = (
            method == "federated"
            and self.federation is not None
            and int(params.get("rounds", 0) or 0) > 0  # type: ignore[call-overload]
            and params.get("backend", "superlink") == "superlink"
        )
        if superlink_rounds:
            from moerge.router_training.superlink import fit_on_superlink

            assert self.federation is not None
            return fit_on_superlink(self.federation, records, params)
        return fit_router(method, records, params)

    def activate(self, actor: str, version: int) -> RouterVersionInfo:
        """Activate a trained version in the registry and load it to serve."""
        info = self.registry.activate_router_version(actor, version)
        self._active = self.get(version)
        return info

    # -- periodic retraining ------------------------------------------------------------------
    def scheduled_fit(self) -> tuple[str, dict[str, object]]:
        """The method and parameters a scheduled refit trains: the active router's, so that an
        admin's choice persists across expert changes; the configured default when none is
        active."""
        info = self.registry.active_router_version()
        if info is None:
            return self.default_method, {}
        return info.method, dict(info.params)

    async def run_scheduler(self, tick_seconds: float = 1.0, poll_seconds: float = 0.05) -> None:
        """Ask the policy every tick; fit on a worker thread when it says so.

        Between ticks the registry's in-memory write counter is polled every ``poll_seconds``,
        so that a new expert reaches an incremental router (:meth:`try_extend`) at once rather
        than at the next tick or after the policy's debounce.
        """
        assert self.policy is not None
        while True:
            generation = self.registry.generation()
            waited = 0.0
            while waited < tick_seconds and self.registry.generation() == generation:
                await asyncio.sleep(poll_seconds)
                waited += poll_seconds
            try:
                fingerprint = await asyncio.to_thread(self.registry.expert_set_fingerprint)
                now = time.monotonic()
                if await self._extended(now, fingerprint):
                    continue
                trigger = self.policy.should_train(now, fingerprint)
                if trigger is None:
                    continue
                self.policy.mark_started(now, fingerprint)
                ok = True
                try:
                    method, params = await asyncio.to_thread(self.scheduled_fit)
                    await asyncio.to_thread(self.train, method, params, "system", trigger)
                except (FailedPrecondition, NotFound):
                    pass  # nothing to route among yet
                except Exception:
                    ok = False
                    log.exception("scheduled router fit failed; the previous router stays active")
                self.policy.mark_finished(time.monotonic(), fingerprint, ok)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("router scheduler tick failed")

    async def _extended(self, now: float, fingerprint: str) -> bool:
        """Try :meth:`try_extend` for a changed expert set; True when it produced a version."""
        policy = self.policy
        assert policy is not None
        active = self._active
        if (
            policy.running
            or fingerprint == policy.trained_fingerprint
            or active is None
            or not active.router.incremental
        ):
            return False
        try:
            info = await asyncio.to_thread(self.try_extend)
        except Exception:
            log.exception("extending the active router failed; a full refit follows")
            return False
        if info is None:
            return False
        policy.mark_started(now, fingerprint)
        policy.mark_finished(time.monotonic(), fingerprint, True)
        return True

    def start(self) -> None:
        """Start the retraining scheduler when a policy is set (once)."""
        if self.policy is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run_scheduler())

    async def stop_scheduler(self) -> None:
        """Cancel the retraining scheduler and wait for it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def follow_active(self, poll_seconds: float) -> None:
        """Serve the registry's active version within ``poll_seconds`` of any replica (or an
        admin through another replica) activating it; runs until cancelled."""
        while True:
            await asyncio.sleep(poll_seconds)
            try:
                info = await asyncio.to_thread(self.registry.active_router_version)
                current = self._active.version.version if self._active is not None else None
                if info is not None and info.version != current:
                    self._active = await asyncio.to_thread(self.get, info.version)
                    log.info("now serving router version %d (activated elsewhere)", info.version)
            except Exception:  # a database blip must not stop the next poll
                log.warning("cannot read the active router version", exc_info=True)

    async def stop(self) -> None:
        """Stop the scheduler and any SuperLink this coordinator started."""
        await self.stop_scheduler()
        if self.federation is not None:  # a SuperLink this coordinator started stops with it
            await asyncio.to_thread(self.federation.close)
            self.federation = None


def open_federation(config: CoordinatorConfig) -> SuperLinkFederation | None:
    """The Flower SuperLink of config ``superlink``: started as a child process, or existing."""
    if not config.superlink:
        return None
    from moerge.router_training.superlink import SuperLinkFederation

    work_dir = Path(config.data_dir) / "federation"
    ca = config.superlink_ca or config.tls_cert
    if config.superlink == "start":
        return SuperLinkFederation.start(
            config.superlink_listen,
            work_dir,
            certfile=config.tls_cert,
            keyfile=config.tls_key,
            root_certificates=ca,
        )
    return SuperLinkFederation(config.superlink, work_dir, root_certificates=ca)
