"""Per-contributor upload rate limits: token buckets for upload bytes and for uploads started.

Why: one contributor (or one stolen credential) must not be able to fill the staging disk or
take all of the coordinator's upload bandwidth. Three limits, each ``0`` = unlimited, set in
:class:`~moerge.coordinator.config.CoordinatorConfig`:

* ``upload_bytes_per_second`` is a *pace*: a stream going faster is slowed down (the servicer
  waits before reading the next chunk), never refused;
* ``upload_bytes_per_hour`` is a *quota*: a chunk beyond it is refused with RESOURCE_EXHAUSTED
  and a ``retry-after`` (seconds) in the trailing metadata. The bytes already received stay
  staged, so the client resumes from its offset once the bucket has refilled;
* ``uploads_per_hour`` is a quota on *new* upload ids; resuming an upload that already exists is
  never counted, so a refused or cut stream can always be finished.

A bucket refills continuously at ``limit / period`` and holds at most one period's allowance
(the burst). State is in memory, per coordinator process: a restart forgets it.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from moerge.coordinator.config import CoordinatorConfig
from moerge.refusals import ResourceExhausted

HOUR = 3600.0


def now() -> float:
    """The limiter's clock (a module function, so that a test can move time forward)."""
    return time.monotonic()


class RateLimited(ResourceExhausted):
    """A quota was hit; ``retry_after_seconds`` says when the request would pass."""

    def __init__(self, what: str, retry_after_seconds: float) -> None:
        self.retry_after_seconds = max(1, math.ceil(retry_after_seconds))
        super().__init__(
            f"upload rate limit reached ({what}); the upload is kept and can be resumed: "
            f"retry in {self.retry_after_seconds} s"
        )


@dataclass
class TokenBucket:
    """``tokens`` refill at ``rate`` per second up to ``capacity``."""

    rate: float
    capacity: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, capacity: float, at: float) -> TokenBucket:
        return cls(rate=rate, capacity=capacity, tokens=capacity, updated=at)

    def _refill(self, at: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (at - self.updated) * self.rate)
        self.updated = at

    def take(self, amount: float, at: float) -> float:
        """Take ``amount`` if held and return 0; else take nothing and return the wait (s).

        An amount above the capacity waits for a full bucket and empties it, so that one large
        chunk can always pass eventually.
        """
        self._refill(at)
        needed = min(amount, self.capacity)
        if self.tokens >= needed:
            self.tokens -= needed
            return 0.0
        return (needed - self.tokens) / self.rate

    def pace(self, amount: float, at: float) -> float:
        """Take ``amount`` even into debt; return how long to wait for the rate to hold (s)."""
        self._refill(at)
        self.tokens -= amount
        return max(0.0, -self.tokens / self.rate)


class UploadLimiter:
    """The three upload limits of every contributor; thread-safe."""

    def __init__(
        self, bytes_per_second: float = 0, bytes_per_hour: float = 0, uploads_per_hour: float = 0
    ) -> None:
        self.bytes_per_second = float(bytes_per_second)
        self.bytes_per_hour = float(bytes_per_hour)
        self.uploads_per_hour = float(uploads_per_hour)
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: CoordinatorConfig) -> UploadLimiter:
        return cls(
            config.upload_bytes_per_second, config.upload_bytes_per_hour, config.uploads_per_hour
        )

    @property
    def enabled(self) -> bool:
        return bool(self.bytes_per_second or self.bytes_per_hour or self.uploads_per_hour)

    def _bucket(
        self, contributor_id: str, kind: str, per_period: float, period: float
    ) -> TokenBucket:
        key = (contributor_id, kind)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket.full(per_period / period, per_period, now())
        return bucket

    def start_upload(self, contributor_id: str) -> None:
        """Count a new upload id; raise :class:`RateLimited` beyond ``uploads_per_hour``."""
        if not self.uploads_per_hour:
            return
        with self._lock:
            bucket = self._bucket(contributor_id, "starts", self.uploads_per_hour, HOUR)
            wait = bucket.take(1, now())
        if wait:
            raise RateLimited(f"{self.uploads_per_hour:g} new uploads per hour", wait)

    def receive(self, contributor_id: str, nbytes: int) -> float:
        """Count a chunk; raise beyond the hourly quota, else return the pacing delay (s)."""
        with self._lock:
            at = now()
            if self.bytes_per_hour:
                hourly = self._bucket(contributor_id, "bytes/h", self.bytes_per_hour, HOUR)
                wait = hourly.take(nbytes, at)
                if wait:
                    raise RateLimited(f"{self.bytes_per_hour:g} bytes per hour", wait)
            if not self.bytes_per_second:
                return 0.0
            return self._bucket(contributor_id, "bytes/s", self.bytes_per_second, 1.0).pace(
                nbytes, at
            )
