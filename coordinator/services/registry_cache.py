"""Registry reads on the request path, remembered until the registry changes (or 1 s passes).

Profiling ``Predict`` on a tiny model (``benchmarks/predict_overhead.py``) showed the database
costing more than the model: every call authenticated its token, read every active expert (with
its statistics and files) to pick a router, and read each routed expert again for its name.
Those answers change only when the registry is written, so they are kept here and dropped when:

* this process writes the registry (:attr:`Registry.generation` moves): a revoked credential, a
  quarantined expert or a new router version is seen by the very next request;
* they are :data:`MAX_AGE_SECONDS` old: the bound for writes made by *another* process sharing
  the database (a second coordinator on the same PostgreSQL, a manual SQL fix).

Only successful reads are kept: refusals (unknown token, inactive expert) go to the database
every time, so nothing becomes valid late. Entries live in a dict, which is safe to share
between the event loop and worker threads under the GIL.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

#: The longest a remembered answer is used without the registry saying it is still current.
MAX_AGE_SECONDS = 1.0

Value = TypeVar("Value")


@dataclass(frozen=True)
class _Entry(Generic[Value]):
    value: Value
    generation: int
    expires: float  # time.monotonic()


class GenerationCache(Generic[Value]):
    """A bounded map whose entries hold while ``generation()`` is unchanged and they are young.

    ``get`` returns None when there is no current entry. Read ``generation()`` *before* reading
    the value to remember and hand it to :meth:`put`: a write that lands in between then
    invalidates the entry instead of hiding behind it.
    """

    def __init__(
        self,
        generation: Callable[[], int],
        max_age_seconds: float | None = None,  # None: MAX_AGE_SECONDS
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.generation = generation
        self.max_age = MAX_AGE_SECONDS if max_age_seconds is None else max_age_seconds
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[Hashable, _Entry[Value]] = {}

    def get(self, key: Hashable) -> Value | None:
        """The cached value, or None when absent, expired or cached under an older registry
        generation."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.generation != self.generation() or self.clock() >= entry.expires:
            self._entries.pop(key, None)
            return None
        return entry.value

    def put(self, key: Hashable, value: Value, generation: int) -> Value:
        """Remember ``value``, read at ``generation``; returns it for chaining."""
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # arbitrary keys (tokens, expert filters) cannot grow memory
        self._entries[key] = _Entry(value, generation, self.clock() + self.max_age)
        return value

    def get_or_read(self, key: Hashable, read: Callable[[], Value | None]) -> Value | None:
        """The current entry, else ``read()`` (remembered unless it is None)."""
        cached = self.get(key)
        if cached is not None:
            return cached
        generation = self.generation()
        value = read()
        return value if value is None else self.put(key, value, generation)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
