"""Everything the servicers share: config, registry, blobs, base model, uploads, routers, engine.

:meth:`CoordinatorState.open` migrates the database, cleans up after a crash (stale temp blobs)
and bootstraps the admin credential; this class is the only place that wires the pieces
together. The one piece built later is the inference service
(:meth:`CoordinatorState.inference_service`), from the same fields, on the first request that
needs it: its engine loads the base model, which a replica that only takes uploads (or a test
that never predicts) should not pay for. The replica that leads
(:mod:`moerge.coordinator.leadership`) fails router fits a dead process left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from moerge.coordinator.config import CoordinatorConfig
from moerge.coordinator.housekeeping import run_periodically
from moerge.coordinator.inference.engine_process import EngineProcess
from moerge.coordinator.inference.service import InferenceService
from moerge.coordinator.interceptors.rate_limit import Buckets, LocalBuckets
from moerge.coordinator.interceptors.shared_limits import open_buckets
from moerge.coordinator.leadership import Leadership
from moerge.coordinator.services.expert_store import ExpertStore
from moerge.coordinator.services.routers import RouterService
from moerge.coordinator.uploads.base_model import BaseModelSpec, describe_base_model
from moerge.coordinator.uploads.privacy_policy import PrivacyPolicy
from moerge.coordinator.uploads.receiver import UploadReceiver
from moerge.router_training.policy import RetrainPolicy
from moerge.storage.blobstore import BlobStore
from moerge.storage.db import make_engine, upgrade
from moerge.storage.registry import Registry

if TYPE_CHECKING:  # boto3 only with an S3 store
    from moerge.coordinator.uploads.object_uploads import ObjectUploads

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin-token"


@dataclass
class CoordinatorState:
    """The coordinator's shared pieces, wired once by :meth:`open` and closed by :meth:`aclose`."""

    config: CoordinatorConfig
    engine: Engine
    registry: Registry
    blobs: BlobStore
    spec: BaseModelSpec
    uploads: UploadReceiver
    experts: ExpertStore
    routers: RouterService
    objects: ObjectUploads | None = None  # direct uploads, with an S3 store and part size > 0
    # the rate limits' token buckets: shared by the replicas on PostgreSQL, else in memory
    buckets: Buckets = field(default_factory=LocalBuckets)
    inference: InferenceService | None = None  # built by inference_service() on first use
    leadership: Leadership | None = None  # set by start_background unless role is inference
    _housekeeping: asyncio.Task[None] | None = field(default=None, repr=False)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, repr=False)
    _inference_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, config: CoordinatorConfig) -> CoordinatorState:
        """Open the data folder, migrate the registry, open the blob store and wire every piece to
        them (see the module docstring)."""
        data_dir = Path(config.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(config.database_url)
        upgrade(engine)
        blobs = config.open_blob_store()
        blobs.cleanup_temp()  # this process's temp files only
        registry = Registry(engine, blobs)
        bootstrap_admin(registry, config)
        spec = describe_base_model(
            config.base_model,
            config.base_model_id,
            config.task_type,
            tuple(config.target_modules),
            config.max_lora_rank,
            PrivacyPolicy(
                config.min_examples_without_dp, config.max_epsilon, config.require_dp_training
            ),
        )
        experts = ExpertStore(blobs, data_dir / "experts")
        policy = (
            RetrainPolicy(config.retrain_debounce_seconds, config.retrain_interval_seconds)
            if config.auto_retrain
            else None
        )
        routers = RouterService(registry, blobs, experts, config.router_method, policy)
        routers.load_active()
        uploads = UploadReceiver(
            registry,
            blobs,
            config.staging_dir,
            spec,
            config.max_upload_bytes,
            shared=bool(config.upload_staging_dir),
        )
        return cls(
            objects=open_object_uploads(config, registry, blobs, uploads),
            buckets=open_buckets(engine, config.rate_limit_lease_seconds),
            config=config,
            engine=engine,
            registry=registry,
            blobs=blobs,
            spec=spec,
            uploads=uploads,
            experts=experts,
            routers=routers,
        )

    async def inference_service(self) -> InferenceService:
        """The inference service, built on first use (off the event loop) and only once."""
        if self.inference is None:
            return await asyncio.to_thread(self._build_inference)
        return self.inference

    def _build_inference(self) -> InferenceService:
        with self._inference_lock:  # two first requests at once build one service
            if self.inference is None:
                remote = (
                    EngineProcess(self.config, self.registry.generation)
                    if self.config.predict_process
                    else None
                )
                self.inference = InferenceService(
                    self.config, self.registry, self.experts, self.routers, engine_process=remote
                )
            return self.inference

    async def start_background(self) -> None:
        """Every replica follows the active router; the leader alone also runs the scheduler
        and housekeeping (``coordinator/leadership.py``; on SQLite this process, at once)."""
        self._tasks.append(
            asyncio.create_task(
                self.routers.follow_active(self.config.router_poll_seconds),
                name="moerge-router-follow",
            )
        )
        if self.config.role == "inference":
            return
        self.leadership = Leadership(
            self.engine, self._lead, self._stop_leading, self.config.leader_check_seconds
        )
        if not self.leadership.shared:
            self.leadership.is_leader = True
            await self._lead()
            return
        self._tasks.append(asyncio.create_task(self.leadership.run(), name="moerge-leadership"))

    async def _lead(self) -> None:
        """Become the leader: fits a dead leader left are failed, the scheduler and the sweep
        start."""
        await asyncio.to_thread(self.registry.fail_interrupted_router_versions)
        self.routers.start()
        if self.config.housekeeping_interval_seconds > 0:
            self._housekeeping = asyncio.create_task(
                run_periodically(
                    self.registry,
                    self.blobs,
                    self.uploads,
                    interval_seconds=self.config.housekeeping_interval_seconds,
                    blob_min_age_seconds=self.config.orphan_blob_min_age_seconds,
                    stale_upload_seconds=self.config.stale_upload_seconds,
                    objects=self.objects,
                ),
                name="moerge-housekeeping",
            )

    async def _stop_leading(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
            self._housekeeping = None
        await self.routers.stop_scheduler()

    async def aclose(self) -> None:
        """Stop the background tasks and the leader's housekeeping, the router service, the
        inference service if one was built, then dispose of the database engine."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._stop_leading()
        await self.routers.stop()
        if self.inference is not None:
            await self.inference.aclose()
        self.engine.dispose()


def open_object_uploads(
    config: CoordinatorConfig, registry: Registry, blobs: BlobStore, uploads: UploadReceiver
) -> ObjectUploads | None:
    """Direct uploads when the blobs live in an S3 store and ``object_part_bytes`` > 0."""
    if not config.blob_store or not config.object_part_bytes:
        return None
    from moerge.coordinator.uploads.object_uploads import ObjectUploads
    from moerge.storage.blobstore_s3 import S3BlobStore, make_client

    assert isinstance(blobs, S3BlobStore)
    presigner = None
    if config.s3_public_endpoint_url:
        presigner = make_client(config.s3_public_endpoint_url, config.s3_region)
    return ObjectUploads(
        registry, blobs, uploads, config.object_part_bytes, config.object_url_seconds, presigner
    )


def bootstrap_admin(registry: Registry, config: CoordinatorConfig) -> None:
    """Use the operator's admin token, or mint one on first start and show it once.

    The minted token is printed to stdout (never to the log) and written to
    ``<data_dir>/admin-token`` with mode 0600 so that local tools on the same machine can use it.
    """
    if config.admin_token:
        registry.import_admin_token(config.admin_token, "system")
        return
    if registry.has_admin_credential():
        return
    token = registry.create_admin_credential("system")
    path = Path(config.data_dir) / ADMIN_TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    print(
        "First start: created an admin token (shown once; also saved with mode 0600 in "
        f"{path}):\n  {token}",
        file=sys.stdout,
        flush=True,
    )
