"""Token buckets shared through PostgreSQL: one limit for several replicas, leased locally.

Each ``SharedBuckets`` here plays one replica (its own leases in memory) over one real
PostgreSQL database; the replica-process test is tests/reliability/test_shared_rate_limits.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from moerge.coordinator.interceptors import rate_limit
from moerge.coordinator.interceptors.rate_limit import LocalBuckets, UploadLimiter
from moerge.coordinator.interceptors.shared_limits import SharedBuckets, open_buckets
from moerge.storage.db import make_engine, upgrade

HOUR = 3600.0


@pytest.fixture
def engine(fresh_postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(fresh_postgres_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.mark.postgres
def test_a_quota_split_across_replicas_is_refused_once_the_shared_budget_is_spent(
    engine: Engine,
) -> None:
    replicas = [SharedBuckets(engine), SharedBuckets(engine)]
    admitted = 0
    for call in range(20):  # 10 per hour, alternating replicas; the refill in a second: 0.003
        if replicas[call % 2].take("inference/alice", 10 / HOUR, 10, 1) == 0:
            admitted += 1
    assert admitted == 10  # each replica's own bucket would have let 20 through
    wait = replicas[0].take("inference/alice", 10 / HOUR, 10, 1)
    assert 0 < wait <= 360  # one token refills in 6 minutes
    assert replicas[1].take("inference/bob", 10 / HOUR, 10, 1) == 0  # per key


@pytest.mark.postgres
def test_a_refused_key_is_answered_from_memory_until_its_retry_after(engine: Engine) -> None:
    replica = SharedBuckets(engine)
    assert replica.take("starts/alice", 1 / HOUR, 1, 1) == 0
    trips = replica.round_trips
    waits = [replica.take("starts/alice", 1 / HOUR, 1, 1) for _ in range(50)]
    assert all(0 < wait <= HOUR for wait in waits)
    assert replica.round_trips == trips + 1  # the first refusal asks; the rest do not


@pytest.mark.postgres
def test_a_busy_caller_costs_one_round_trip_per_lease_not_per_call(engine: Engine) -> None:
    replica = SharedBuckets(engine, lease_seconds=1.0)
    # 60,000 per minute: a lease is one second's refill, 1,000 calls
    admitted = sum(replica.take("inference/app", 1000.0, 60_000, 1) == 0 for _ in range(2000))
    assert admitted == 2000
    assert replica.round_trips <= 3


@pytest.mark.postgres
def test_over_any_interval_replicas_admit_at_most_one_lease_period_more_than_the_limit(
    engine: Engine,
) -> None:
    # 100 per second with a burst of 20: drawn as fast as two replicas can for a second
    rate, capacity, lease = 100.0, 20.0, 0.2
    replicas = [SharedBuckets(engine, lease_seconds=lease) for _ in range(2)]
    admitted = 0
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        for replica in replicas:
            admitted += replica.take("inference/flood", rate, capacity, 1) == 0
    elapsed = time.monotonic() - started
    assert admitted <= capacity + rate * (elapsed + lease)
    assert admitted >= 0.5 * rate * elapsed  # and the limit is not starved by the leases


@pytest.mark.postgres
def test_a_lease_left_unspent_goes_back_to_the_bucket(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    offset = [0.0]
    monkeypatch.setattr(rate_limit, "now", lambda: time.monotonic() + offset[0])
    # 16 per hour, leases of 1,000 s: 4.4 tokens, capped at 2 (an eighth of the bucket)
    first, second = SharedBuckets(engine, 1000), SharedBuckets(engine, 1000)
    assert first.take("starts/carol", 16 / HOUR, 16, 1) == 0  # leases 2, keeps 1
    assert sum(second.take("starts/carol", 16 / HOUR, 16, 1) == 0 for _ in range(20)) == 14
    offset[0] += 1001  # this replica's lease has expired, still holding 1 (the database's
    # clock, which refills the bucket, has not moved)
    assert first.take("starts/carol", 16 / HOUR, 16, 1) == 0  # gives it back and takes it
    assert first.take("starts/carol", 16 / HOUR, 16, 1) > 0


@pytest.mark.postgres
def test_upload_pacing_holds_across_replicas(engine: Engine) -> None:
    limiters = [UploadLimiter(bytes_per_second=1000, buckets=SharedBuckets(engine)) for _ in "ab"]
    waits = [limiters[i % 2].receive("dave", 500) for i in range(8)]  # 4,000 bytes in all
    # the first second's 1,000 bytes pass; the other 3,000 wait about 3 s at 1,000 B/s
    assert max(waits) == pytest.approx(3.0, abs=0.5)


def test_without_postgresql_a_replica_limits_in_its_own_memory(tmp_path: Path) -> None:
    sqlite = make_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    assert isinstance(open_buckets(sqlite), LocalBuckets)
    unreachable = make_engine("postgresql+psycopg://moerge@127.0.0.1:1/none")
    buckets = SharedBuckets(unreachable)
    assert buckets.take("inference/erin", 2 / HOUR, 2, 1) == 0  # falls back, still limits
    assert buckets.take("inference/erin", 2 / HOUR, 2, 1) == 0
    assert buckets.take("inference/erin", 2 / HOUR, 2, 1) > 0


@pytest.mark.postgres
def test_a_draw_says_when_it_can_be_answered_without_the_database(engine: Engine) -> None:
    replica = SharedBuckets(engine)
    assert not replica.answers_from_memory("inference/frank", 1)  # no lease yet: ask
    assert replica.take("inference/frank", 10.0, 600, 1) == 0  # leases 10 (one second's)
    assert replica.answers_from_memory("inference/frank", 1)
    assert not replica.answers_from_memory("inference/frank", 100)  # more than the lease holds
    assert replica.take("starts/frank", 1 / HOUR, 1, 1) == 0
    assert replica.take("starts/frank", 1 / HOUR, 1, 1) > 0
    assert replica.answers_from_memory("starts/frank", 1)  # the refusal stands until retry-after
    assert LocalBuckets().answers_from_memory("anything", 1)
