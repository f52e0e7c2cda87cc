"""Per-caller rate limits on inference (Predict, Route, Generate): a token bucket per credential.

Why: a user API key handed to an application must not be able to take all of the coordinator's
inference capacity, and a leaked one should cost little. Each credential (API key, contributor
or admin token) has its own bucket of ``limit`` requests that refills continuously at
``limit / 60`` per second, so up to one minute's allowance may come as a burst. The limit is the
key's own ``rate_limit_per_minute`` when it has one, else
:attr:`~moerge.coordinator.config.CoordinatorConfig.inference_requests_per_minute` (``0`` =
unlimited). gRPC and HTTP calls draw from the same bucket. A refused request is
:class:`InferenceRateLimited` (RESOURCE_EXHAUSTED with ``retry-after`` seconds over gRPC, HTTP
429 with ``Retry-After``). State is in memory, per coordinator process: a restart forgets it.
"""

from __future__ import annotations

import math
import threading

from moerge.coordinator.interceptors import rate_limit
from moerge.coordinator.interceptors.rate_limit import TokenBucket
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
    """One bucket per credential; thread-safe."""

    def __init__(self, default_per_minute: int = 0, max_callers: int = 100_000) -> None:
        self.default_per_minute = int(default_per_minute)
        self.max_callers = max_callers
        self._buckets: dict[str, tuple[int, TokenBucket]] = {}
        self._lock = threading.Lock()

    def limit_for(self, principal: Principal) -> int:
        """Requests per minute allowed to ``principal`` (0: unlimited)."""
        return principal.rate_limit_per_minute or self.default_per_minute

    def admit(self, principal: Principal, method: str) -> None:
        """Count one call of ``method``; raise :class:`InferenceRateLimited` beyond the limit."""
        if method not in LIMITED_METHODS:
            return
        limit = self.limit_for(principal)
        if not limit:
            return
        with self._lock:
            at = rate_limit.now()
            held = self._buckets.get(principal.credential_id)
            if held is None or held[0] != limit:  # new caller, or its limit changed
                if len(self._buckets) >= self.max_callers:
                    self._buckets.clear()  # bounded memory; forgetting only lets calls through
                held = (limit, TokenBucket.full(limit / MINUTE, limit, at))
                self._buckets[principal.credential_id] = held
            wait = held[1].take(1, at)
        if wait:
            raise InferenceRateLimited(limit, wait)
