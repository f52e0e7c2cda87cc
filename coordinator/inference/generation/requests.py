"""One generation request as an explicit state machine, and the events it streams to its caller.

::

    WAITING --admit (prefill)--> RUNNING --EOS / stop string / max_new_tokens--> FINISHED
       |                            |
       +------- cancel() -----------+--------------------------------------------> CANCELLED
       +------- refused at admission (bad routing, prompt too long) ------------> FAILED

The scheduler (one thread) moves requests between states; the caller (any thread, or an asyncio
task) only reads events and may call :meth:`GenerationRequest.cancel`, which the scheduler
honours before the next decode step, freeing the request's rows and experts at once.

Events reach the caller through ``sink``, called on the scheduler's thread: it must be quick and
thread-safe (e.g. ``loop.call_soon_threadsafe(queue.put_nowait, event)``).
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from moerge.coordinator.inference.generation.sampling import SamplingParams
from moerge.coordinator.inference.plan import RoutingPlan
from moerge.coordinator.inference.results import ExpertWeight


class RequestState(enum.Enum):
    """Where a generation request is: waiting for rows, decoding, or ended (finished, cancelled,
    failed)."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass(frozen=True)
class GenerationStarted:
    """First event: who serves the request (empty ``experts`` for token-level routing)."""

    experts: tuple[ExpertWeight, ...]
    aggregation: str
    prompt_tokens: int


@dataclass(frozen=True)
class TextDelta:
    """Text released since the previous event (complete characters, no stop string)."""

    text: str
    tokens: int


@dataclass(frozen=True)
class GenerationFinished:
    """Last event of a successful request."""

    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    experts: tuple[ExpertWeight, ...]
    confidence: float
    time_to_first_token_ms: float
    latency_ms: float


@dataclass(frozen=True)
class GenerationFailed:
    """Last event of a refused request: ``error`` is what the caller should raise."""

    error: BaseException


GenerationEvent = GenerationStarted | TextDelta | GenerationFinished | GenerationFailed


@dataclass(eq=False)
class GenerationRequest:
    """What a caller asked for, and where its events go."""

    prompt: str  # the text given to the tokenizer (a chat prompt is already rendered)
    routing_text: str  # what example-level routers embed (a chat's last user message)
    sampling: SamplingParams
    sink: Callable[[GenerationEvent], None]
    plan: RoutingPlan | None = None  # None: the engine's active router with its defaults
    chat: bool = False  # ``prompt`` is a rendered chat template (it holds its special tokens)
    state: RequestState = RequestState.WAITING
    created: float = field(default_factory=time.perf_counter)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the scheduler to drop this request before its next step (any thread)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """Whether the caller cancelled the request."""
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        """Whether the request has ended, one way or another."""
        return self.state in (RequestState.FINISHED, RequestState.CANCELLED, RequestState.FAILED)
