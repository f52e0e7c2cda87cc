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
(the burst). The limiters name their buckets and leave keeping them to a :class:`Buckets`:
:class:`LocalBuckets` in this process's memory (SQLite: one process; a restart forgets them), or
:class:`~moerge.coordinator.interceptors.shared_limits.SharedBuckets` in PostgreSQL, so that the
limits hold across replicas.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Protocol

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
        """A bucket that starts full at ``at``."""
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


class Buckets(Protocol):
    """Named token buckets; ``rate`` and ``capacity`` come with every call (a key's limit may
    change, as an API key's ``rate_limit_per_minute`` does)."""

    def take(self, key: str, rate: float, capacity: float, amount: float) -> float:
        """:meth:`TokenBucket.take` on the bucket ``key``: 0 if taken, else the wait (s)."""
        ...

    def pace(self, key: str, rate: float, capacity: float, amount: float) -> float:
        """:meth:`TokenBucket.pace` on the bucket ``key``: the wait that keeps the rate (s)."""
        ...

    def answers_from_memory(self, key: str, amount: float) -> bool:
        """Whether taking ``amount`` from ``key`` now needs no database round trip (so that
        a caller on the event loop may take it there, else in a worker thread)."""
        ...


class LocalBuckets:
    """Buckets in this process's memory; thread-safe, at most ``max_keys`` of them."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, key: str, rate: float, capacity: float, at: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None or (bucket.rate, bucket.capacity) != (rate, capacity):
            if len(self._buckets) >= self.max_keys:
                self._buckets.clear()  # bounded memory; forgetting only lets calls through
            bucket = self._buckets[key] = TokenBucket.full(rate, capacity, at)
        return bucket

    def take(self, key: str, rate: float, capacity: float, amount: float) -> float:
        """Take ``amount`` from the key's bucket now if it holds it; else how long to wait (s)."""
        with self._lock:
            at = now()
            return self._bucket(key, rate, capacity, at).take(amount, at)

    def pace(self, key: str, rate: float, capacity: float, amount: float) -> float:
        """Take ``amount``, going into debt if needed; how long the caller should pause to pay it
        back (s)."""
        with self._lock:
            at = now()
            return self._bucket(key, rate, capacity, at).pace(amount, at)

    def answers_from_memory(self, key: str, amount: float) -> bool:
        """Always: these buckets live in this process."""
        return True


class UploadLimiter:
    """The three upload limits of every contributor, kept in ``buckets``."""

    def __init__(
        self,
        bytes_per_second: float = 0,
        bytes_per_hour: float = 0,
        uploads_per_hour: float = 0,
        buckets: Buckets | None = None,
    ) -> None:
        self.bytes_per_second = float(bytes_per_second)
        self.bytes_per_hour = float(bytes_per_hour)
        self.uploads_per_hour = float(uploads_per_hour)
        self.buckets: Buckets = buckets if buckets is not None else LocalBuckets()

    @classmethod
    def from_config(
        cls, config: CoordinatorConfig, buckets: Buckets | None = None
    ) -> UploadLimiter:
        """The limiter of the config's upload limits, on shared buckets when given."""
        return cls(
            config.upload_bytes_per_second,
            config.upload_bytes_per_hour,
            config.uploads_per_hour,
            buckets,
        )

    @property
    def enabled(self) -> bool:
        """Whether any upload limit is set."""
        return bool(self.bytes_per_second or self.bytes_per_hour or self.uploads_per_hour)

    def start_upload(self, contributor_id: str) -> None:
        """Count a new upload id; raise :class:`RateLimited` beyond ``uploads_per_hour``."""
        if not self.uploads_per_hour:
            return
        per_hour = self.uploads_per_hour
        wait = self.buckets.take(f"starts/{contributor_id}", per_hour / HOUR, per_hour, 1)
        if wait:
            raise RateLimited(f"{per_hour:g} new uploads per hour", wait)

    def receive(self, contributor_id: str, nbytes: int) -> float:
        """Count a chunk; raise beyond the hourly quota, else return the pacing delay (s)."""
        if self.bytes_per_hour:
            per_hour = self.bytes_per_hour
            wait = self.buckets.take(f"bytes-h/{contributor_id}", per_hour / HOUR, per_hour, nbytes)
            if wait:
                raise RateLimited(f"{per_hour:g} bytes per hour", wait)
        if not self.bytes_per_second:
            return 0.0
        per_second = self.bytes_per_second
        return self.buckets.pace(f"bytes-s/{contributor_id}", per_second, per_second, nbytes)
