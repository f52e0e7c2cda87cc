"""Per-caller rate limits on inference (Predict, Route, Generate): a token bucket per credential.

Why: a user API key handed to an application must not be able to take all of the coordinator's
inference capacity, and a leaked one should cost little. Each credential (API key, contributor
or admin token) has its own bucket of ``limit`` requests that refills continuously at
``limit / 60`` per second, so up to one minute's allowance may come as a burst. The limit is the
key's own ``rate_limit_per_minute`` when it has one, else
:attr:`~moerge.coordinator.config.CoordinatorConfig.inference_requests_per_minute` (``0`` =
unlimited). gRPC and HTTP calls draw from the same bucket. A refused request is
:class:`InferenceRateLimited` (RESOURCE_EXHAUSTED with ``retry-after`` seconds over gRPC, HTTP
429 with ``Retry-After``). The buckets are a :class:`~.rate_limit.Buckets`: in memory (one
process), or shared by the replicas over PostgreSQL (:mod:`.shared_limits`).
"""

from __future__ import annotations

import asyncio
import math

from moerge.coordinator.interceptors.rate_limit import Buckets, LocalBuckets
from moerge.refusals import ResourceExhausted
from moerge.storage.records import Principal

MINUTE = 60.0
#: The gRPC methods that draw from a caller's bucket (the HTTP routes name the same methods).
LIMITED_METHODS = frozenset(
    {
        "/moerge.v1.InferenceService/Predict",
        "/moerge.v1.InferenceService/Route",
        "/moerge.v1.InferenceService/Generate",
    }
)


class InferenceRateLimited(ResourceExhausted):
    """Too many inference requests; ``retry_after_seconds`` says when one would pass."""

    def __init__(self, per_minute: int, retry_after_seconds: float) -> None:
        self.retry_after_seconds = max(1, math.ceil(retry_after_seconds))
        super().__init__(
            f"inference rate limit reached ({per_minute} requests per minute): "
            f"retry in {self.retry_after_seconds} s"
        )


class InferenceLimiter:
    """One bucket per credential (and limit: a changed limit starts a full bucket)."""

    def __init__(self, default_per_minute: int = 0, buckets: Buckets | None = None) -> None:
        self.default_per_minute = int(default_per_minute)
        self.buckets: Buckets = buckets if buckets is not None else LocalBuckets()

    def limit_for(self, principal: Principal) -> int:
        """Requests per minute allowed to ``principal`` (0: unlimited)."""
        return principal.rate_limit_per_minute or self.default_per_minute

    async def admit(self, principal: Principal, method: str) -> None:
        """Count one call of ``method``; raise :class:`InferenceRateLimited` beyond the limit.

        Called from the event loop: a draw that must ask the database (shared buckets,
        :mod:`.shared_limits`) runs in a worker thread, one answered from memory right here.
        """
        limit = self.limit_for(principal) if method in LIMITED_METHODS else 0
        if not limit:
            return
        if self.buckets.answers_from_memory(self._key(principal, limit), 1):
            wait = self._take(principal, limit)
        else:
            wait = await asyncio.to_thread(self._take, principal, limit)
        if wait:
            raise InferenceRateLimited(limit, wait)

    @staticmethod
    def _key(principal: Principal, limit: int) -> str:
        return f"inference/{limit}/{principal.credential_id}"

    def _take(self, principal: Principal, limit: int) -> float:
        return self.buckets.take(self._key(principal, limit), limit / MINUTE, limit, 1)
