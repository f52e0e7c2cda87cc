"""When should the coordinator refit the router? A pure decision rule with an injected clock.

The coordinator polls :meth:`RetrainPolicy.should_train` every few seconds (also while a fit is
running) with the current time and a *fingerprint* of the active expert set (any string that
changes whenever the set or an expert's files change, e.g. :func:`expert_set_fingerprint` of
``"<expert id>@<content digest>"`` strings). The policy never reads a clock and never starts
anything: it returns the name of the trigger that fires, or ``None``, and is told when a fit
starts and finishes. Rules, in order:

1. never while a fit is running (no concurrent fits);
2. nothing if the fingerprint equals that of the last *successful* fit;
3. ``"expert_change"``: the fingerprint has been unchanged for ``debounce_seconds`` (a burst of
   uploads yields one fit, after the burst) and no fit of this exact fingerprint has failed;
4. ``"periodic"``: ``interval_seconds`` have passed since the last fit finished (or since the
   first poll, before any fit) -- this bounds staleness when the set never settles, and retries
   a failed fingerprint, at most once per interval.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

EXPERT_CHANGE = "expert_change"
PERIODIC = "periodic"


def expert_set_fingerprint(members: Iterable[str]) -> str:
    """Order-independent SHA-256 of a set of strings (e.g. ``"id@digest"`` per expert)."""
    digest = hashlib.sha256()
    for member in sorted(set(members)):
        digest.update(member.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass
class RetrainPolicy:
    """Debounced, periodic, non-concurrent refit decisions (see the module docstring)."""

    debounce_seconds: float = 30.0  # quiet period after the last change before refitting
    interval_seconds: float = 600.0  # at most this long between fits while anything changed
    _seen_fingerprint: str | None = field(default=None, init=False, repr=False)
    _seen_since: float = field(default=0.0, init=False, repr=False)
    _first_poll: float | None = field(default=None, init=False, repr=False)
    _trained_fingerprint: str | None = field(default=None, init=False, repr=False)
    _failed_fingerprint: str | None = field(default=None, init=False, repr=False)
    _running: bool = field(default=False, init=False, repr=False)
    _last_finished: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.debounce_seconds >= 0:
            raise ValueError(f"debounce_seconds must be >= 0, got {self.debounce_seconds!r}")
        if not self.interval_seconds > 0:
            raise ValueError(f"interval_seconds must be > 0, got {self.interval_seconds!r}")

    @property
    def running(self) -> bool:
        """Whether a fit has started and not yet finished."""
        return self._running

    @property
    def trained_fingerprint(self) -> str | None:
        """Fingerprint of the last successful fit (``None`` before the first)."""
        return self._trained_fingerprint

    def _observe(self, now: float, fingerprint: str) -> None:
        if self._first_poll is None:
            self._first_poll = now
        if fingerprint != self._seen_fingerprint:
            self._seen_fingerprint = fingerprint
            self._seen_since = now

    def should_train(self, now: float, fingerprint: str) -> str | None:
        """The trigger that fires at ``now`` for the active set ``fingerprint``, or ``None``."""
        self._observe(now, fingerprint)
        if self._running or fingerprint == self._trained_fingerprint:
            return None
        settled = now - self._seen_since >= self.debounce_seconds
        if settled and fingerprint != self._failed_fingerprint:
            return EXPERT_CHANGE
        reference = self._last_finished if self._last_finished is not None else self._first_poll
        if reference is not None and now - reference >= self.interval_seconds:
            return PERIODIC
        return None

    def mark_started(self, now: float, fingerprint: str) -> None:
        """A fit of ``fingerprint`` started at ``now``; ``RuntimeError`` if one is running."""
        if self._running:
            raise RuntimeError("a router fit is already running")
        self._observe(now, fingerprint)
        self._running = True

    def mark_finished(self, now: float, fingerprint: str, ok: bool) -> None:
        """The fit of ``fingerprint`` finished at ``now``, successfully or not."""
        if not self._running:
            raise RuntimeError("no router fit is running")
        self._running = False
        self._last_finished = now
        if ok:
            self._trained_fingerprint = fingerprint
            self._failed_fingerprint = None
        else:
            self._failed_fingerprint = fingerprint
