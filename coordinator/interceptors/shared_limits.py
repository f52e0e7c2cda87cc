"""Rate limits that hold across coordinator replicas: token buckets in PostgreSQL, leased.

Why: buckets in each replica's memory let a caller spread over N replicas spend N times its
limit. Here every bucket is a row of ``rate_buckets`` (key, tokens, updated), and a replica
draws from it with one ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` that refills the bucket
by the database's clock (the replicas' clocks do not matter) and takes a *lease*: more tokens
than the call needs, which the replica keeps in memory for the next calls of that key. A busy
caller so costs one round trip per lease, not one per Predict.

A lease is what the key's rate refills in ``lease_seconds`` (at least what the call needs, at
most an eighth of the bucket). It can be spent for ``lease_seconds``; whatever is left of it is
given back to the bucket in the replica's next round trip for that key. What that gives:

* **overshoot**: tokens are spent at most ``lease_seconds`` after they left the bucket, so over
  any interval of T seconds a caller gets at most what one bucket allows over
  T + ``lease_seconds``: at most ``rate x lease_seconds`` more than one process's limiter
  (one request at 60 per minute and the default 1 s), whatever the number of replicas;
* **undershoot**: a call can be refused while other replicas hold unspent leases of the same
  key: at most one lease per replica, for at most ``lease_seconds``;
* a refused key is refused from memory, with no round trip, until the bucket would hold enough
  again (the ``retry-after`` the refusal reported).

The round trip runs in the calling thread, about a millisecond on a local network, once per
lease and key; :meth:`SharedBuckets.answers_from_memory` tells a caller on the event loop (the
inference limit) when to hand the draw to a worker thread instead. If PostgreSQL cannot be
reached, the replica falls back to buckets in its own memory (the per-replica limit) until it
can. Rows of buckets untouched for two hours (full again: no period is longer than an hour)
are deleted, by each replica at most once a minute.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from sqlalchemy import Engine, TextClause, text
from sqlalchemy.exc import SQLAlchemyError

from moerge.coordinator.interceptors import rate_limit
from moerge.coordinator.interceptors.rate_limit import HOUR, Buckets, LocalBuckets

log = logging.getLogger(__name__)

STALE_SECONDS = 2 * HOUR
SWEEP_EVERY_SECONDS = 60.0

# The bucket after refilling since its last update (and taking back a lease's leftover).
_AVAILABLE = (
    "LEAST(:capacity, b.tokens + :refund + GREATEST(EXCLUDED.updated - b.updated, 0) * :rate)"
)
# What the lease gets: all-or-nothing for a quota (at least ``need``), anything for a pace.
_GRANTED = {
    False: f"CASE WHEN {_AVAILABLE} >= :need THEN LEAST(:want, {_AVAILABLE}) ELSE 0 END",
    True: ":want",
}


def _lease_statement(debt: bool) -> TextClause:
    """A new key starts as a full bucket minus ``want``; an old one refills, then lends."""
    granted = _GRANTED[debt]
    return text(
        "INSERT INTO rate_buckets AS b (key, tokens, granted, updated) "
        "VALUES (:key, :capacity - :want, :want, extract(epoch FROM clock_timestamp())) "
        "ON CONFLICT (key) DO UPDATE SET "
        f"granted = {granted}, tokens = {_AVAILABLE} - ({granted}), "
        "updated = EXCLUDED.updated "
        "RETURNING tokens, granted"
    )


_TAKE, _PACE = _lease_statement(False), _lease_statement(True)
_SWEEP = text(
    "DELETE FROM rate_buckets WHERE updated < extract(epoch FROM clock_timestamp()) - :stale"
)


@dataclass
class Lease:
    """This replica's share of one bucket."""

    tokens: float = 0.0
    expires: float = 0.0  # rate_limit.now() after which the tokens go back to the bucket
    refused_until: float = 0.0  # a quota's refusal, answered from memory until then


class SharedBuckets:
    """:class:`~.rate_limit.Buckets` in PostgreSQL's ``rate_buckets`` table; thread-safe."""

    def __init__(self, engine: Engine, lease_seconds: float = 1.0, max_keys: int = 100_000) -> None:
        self.engine = engine
        self.lease_seconds = lease_seconds
        self.max_keys = max_keys
        self.round_trips = 0  # leases taken from the database (tests and benchmarks read it)
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._fallback = LocalBuckets(max_keys)  # while PostgreSQL cannot be reached
        self._unreachable = False
        self._swept = rate_limit.now()

    def take(self, key: str, rate: float, capacity: float, amount: float) -> float:
        """Take ``amount`` (at most a full bucket) from the shared bucket if it holds it; else how
        long to wait (s)."""
        return self._draw(key, rate, capacity, min(amount, capacity), debt=False)

    def pace(self, key: str, rate: float, capacity: float, amount: float) -> float:
        """Take ``amount`` from the shared bucket, into debt if needed; how long to pause (s)."""
        return self._draw(key, rate, capacity, amount, debt=True)

    def answers_from_memory(self, key: str, amount: float) -> bool:
        """A lease that holds ``amount``, or a refusal still standing (a quota's)."""
        with self._lock:
            at = rate_limit.now()
            lease = self._leases.get(key)
            if lease is None:
                return False
            return (lease.expires > at and lease.tokens >= amount) or lease.refused_until > at

    def _draw(self, key: str, rate: float, capacity: float, need: float, debt: bool) -> float:
        if need <= 0:
            return 0.0
        with self._lock:
            at = rate_limit.now()
            lease = self._leases.pop(key, None) or Lease()
            if lease.expires > at and lease.tokens >= need:
                lease.tokens -= need
                self._leases[key] = lease
                return 0.0
            if not debt and lease.refused_until > at:
                self._leases[key] = lease
                return lease.refused_until - at
        want = max(need, min(rate * self.lease_seconds, capacity / 8))
        params = {
            "key": key,
            "rate": float(rate),
            "capacity": float(capacity),
            "need": float(need),
            "want": float(want),
            "refund": float(lease.tokens),  # the leftover of the last lease, spent or expired
        }
        try:
            tokens, granted = self._round_trip(_PACE if debt else _TAKE, params)
        except SQLAlchemyError as exc:
            return self._fall_back(exc, key, rate, capacity, need, debt)
        with self._lock:
            at = rate_limit.now()
            if len(self._leases) >= self.max_keys:
                self._leases.clear()  # bounded memory; the leftovers are lost, never doubled
            if debt or granted >= need:
                self._leases[key] = Lease(granted - need, at + self.lease_seconds)
                return max(0.0, -tokens / rate) if debt else 0.0
            wait = (need - tokens) / rate
            self._leases[key] = Lease(refused_until=at + wait)
            return wait

    def _round_trip(self, statement: TextClause, params: dict[str, object]) -> tuple[float, float]:
        with self.engine.begin() as connection:
            tokens, granted = connection.execute(statement, params).one()
            if rate_limit.now() - self._swept > SWEEP_EVERY_SECONDS:
                self._swept = rate_limit.now()
                connection.execute(_SWEEP, {"stale": STALE_SECONDS})
        self.round_trips += 1
        if self._unreachable:
            self._unreachable = False
            log.warning("rate limits: PostgreSQL reachable again; limits are shared again")
        return float(tokens), float(granted)

    def _fall_back(
        self, exc: Exception, key: str, rate: float, capacity: float, need: float, debt: bool
    ) -> float:
        if not self._unreachable:
            self._unreachable = True
            log.warning("rate limits: PostgreSQL unreachable (%s); limiting per replica", exc)
        draw = self._fallback.pace if debt else self._fallback.take
        return draw(key, rate, capacity, need)


def open_buckets(engine: Engine, lease_seconds: float = 1.0) -> Buckets:
    """Shared buckets on PostgreSQL (replicas); buckets in memory on SQLite (one process)."""
    if engine.dialect.name == "postgresql":
        return SharedBuckets(engine, lease_seconds)
    return LocalBuckets()
