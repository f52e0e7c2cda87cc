"""RetrainPolicy: debounce, periodic refits, no change, no concurrency, retries after failure."""

from __future__ import annotations

import pytest

from moerge.router_training import RetrainPolicy, expert_set_fingerprint


def poll(policy: RetrainPolicy, times: range, fingerprint: str) -> dict[int, str | None]:
    return {t: policy.should_train(float(t), fingerprint) for t in times}


def test_a_change_triggers_once_the_set_is_quiet_for_the_debounce() -> None:
    policy = RetrainPolicy(debounce_seconds=30, interval_seconds=600)
    assert policy.should_train(0.0, "A") is None
    assert policy.should_train(29.0, "A") is None
    assert policy.should_train(30.0, "A") == "expert_change"


def test_each_new_change_restarts_the_debounce() -> None:
    policy = RetrainPolicy(debounce_seconds=30, interval_seconds=600)
    policy.should_train(0.0, "A")
    policy.should_train(20.0, "B")  # another upload lands during the quiet period
    assert policy.should_train(35.0, "B") is None
    assert policy.should_train(50.0, "B") == "expert_change"


def test_no_change_since_the_last_successful_fit_never_triggers() -> None:
    policy = RetrainPolicy(debounce_seconds=30, interval_seconds=600)
    policy.should_train(0.0, "A")
    policy.mark_started(30.0, "A")
    policy.mark_finished(40.0, "A", ok=True)
    assert set(poll(policy, range(40, 5000, 100), "A").values()) == {None}
    # a change that is undone before the debounce ends does not trigger either
    policy.should_train(5000.0, "B")
    assert policy.should_train(5010.0, "A") is None
    assert policy.should_train(5100.0, "A") is None


def test_a_set_that_never_settles_is_refit_periodically() -> None:
    policy = RetrainPolicy(debounce_seconds=30, interval_seconds=600)
    decisions = {t: policy.should_train(float(t), f"set-{t}") for t in range(0, 1300, 20)}
    first = min(t for t, d in decisions.items() if d is not None)
    assert (first, decisions[first]) == (600, "periodic")
    policy.mark_started(600.0, "set-600")
    policy.mark_finished(610.0, "set-600", ok=True)
    assert policy.should_train(1200.0, "set-1200") is None  # only 590 s since the last fit
    assert policy.should_train(1210.0, "set-1210") == "periodic"


def test_fits_never_run_concurrently() -> None:
    policy = RetrainPolicy(debounce_seconds=0, interval_seconds=60)
    policy.mark_started(0.0, "A")
    assert policy.running
    assert policy.should_train(1000.0, "B") is None
    with pytest.raises(RuntimeError, match="already running"):
        policy.mark_started(1000.0, "B")
    policy.mark_finished(1001.0, "A", ok=True)
    assert not policy.running
    assert policy.should_train(1001.0, "B") == "expert_change"
    with pytest.raises(RuntimeError, match="no router fit is running"):
        policy.mark_finished(1002.0, "B", ok=True)


def test_a_failed_fit_is_retried_at_the_periodic_interval_until_it_succeeds() -> None:
    policy = RetrainPolicy(debounce_seconds=30, interval_seconds=600)
    policy.should_train(0.0, "A")
    policy.mark_started(30.0, "A")
    policy.mark_finished(40.0, "A", ok=False)
    # no hot loop on the same failing set ...
    assert set(poll(policy, range(41, 640, 10), "A").values()) == {None}
    # ... but it is retried later, and again after another failure
    assert policy.should_train(640.0, "A") == "periodic"
    policy.mark_started(640.0, "A")
    policy.mark_finished(650.0, "A", ok=False)
    assert policy.should_train(1249.0, "A") is None
    assert policy.should_train(1250.0, "A") == "periodic"
    policy.mark_started(1250.0, "A")
    policy.mark_finished(1260.0, "A", ok=True)
    assert policy.trained_fingerprint == "A"
    assert policy.should_train(5000.0, "A") is None


def test_a_new_set_after_a_failure_triggers_after_the_debounce() -> None:
    policy = RetrainPolicy(debounce_seconds=30, interval_seconds=600)
    policy.should_train(0.0, "A")
    policy.mark_started(30.0, "A")
    policy.mark_finished(40.0, "A", ok=False)
    policy.should_train(50.0, "B")  # e.g. the broken expert was removed
    assert policy.should_train(79.0, "B") is None
    assert policy.should_train(80.0, "B") == "expert_change"


def test_fingerprint_ignores_order_and_duplicates_but_not_content() -> None:
    a = expert_set_fingerprint(["e1@x", "e2@y"])
    assert a == expert_set_fingerprint(["e2@y", "e1@x", "e1@x"])
    assert a != expert_set_fingerprint(["e1@x", "e2@z"])


def test_invalid_timings_are_rejected() -> None:
    with pytest.raises(ValueError, match="interval_seconds"):
        RetrainPolicy(debounce_seconds=1, interval_seconds=0)
    with pytest.raises(ValueError, match="debounce_seconds"):
        RetrainPolicy(debounce_seconds=-1)
