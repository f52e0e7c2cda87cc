"""Streamed generation at the coordinator: prompt or chat -> router -> scheduler -> events.

The registry-aware half of ``Generate`` (the engine half is
:mod:`moerge.coordinator.inference.generation`). It renders chat prompts with the base model's
chat template, picks the router exactly as Predict does (:meth:`InferenceService.choose`), hands
the request to the engine's continuous-batching scheduler and turns the scheduler's thread-side
events into an async iterator. Leaving the iterator early (the client went away, the RPC was
cancelled) cancels the request, which frees its rows before the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from moerge.coordinator.inference.composition_objective import composition_plan
from moerge.coordinator.inference.generation.requests import (
    GenerationEvent,
    GenerationFailed,
    GenerationFinished,
    GenerationRequest,
    TextDelta,
)
from moerge.coordinator.inference.generation.sampling import SamplingParams
from moerge.coordinator.inference.generation.scheduler import QueueFull
from moerge.coordinator.inference.plan import Aggregation, RoutingPlan
from moerge.coordinator.inference.service import Chosen, InferenceService
from moerge.refusals import FailedPrecondition, InvalidArgument, ResourceExhausted

CHAT_ROLES = ("system", "user", "assistant")
MAX_CHAT_MESSAGES = 64


@dataclass(frozen=True)
class RenderedPrompt:
    """What the tokenizer reads, what example-level routers embed, and whether it is a chat."""

    text: str
    routing_text: str
    chat: bool


def render_prompt(
    tokenizer: object, prompt: str, messages: Sequence[tuple[str, str]], max_chars: int
) -> RenderedPrompt:
    """Check a plain prompt or chat messages and render the latter with the chat template.

    Routing reads the last user message of a chat: that is the task the answer is for, and
    contributors' statistics were computed on such texts, not on template markup.
    """
    if bool(prompt) == bool(messages):
        raise InvalidArgument("prompt", "give exactly one of prompt and messages")
    if prompt:
        if not prompt.strip():
            raise InvalidArgument("prompt", "is blank")
        if len(prompt) > max_chars:
            raise InvalidArgument("prompt", f"has {len(prompt)} characters; at most {max_chars}")
        return RenderedPrompt(prompt, prompt, chat=False)
    if len(messages) > MAX_CHAT_MESSAGES:
        raise InvalidArgument("messages", f"at most {MAX_CHAT_MESSAGES} messages")
    total = sum(len(content) for _, content in messages)
    if total > max_chars:
        raise InvalidArgument("messages", f"hold {total} characters; at most {max_chars}")
    for i, (role, content) in enumerate(messages):
        if role not in CHAT_ROLES:
            raise InvalidArgument(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}")
        if not content.strip():
            raise InvalidArgument(f"messages[{i}].content", "is blank")
    users = [content for role, content in messages if role == "user"]
    if not users:
        raise InvalidArgument("messages", "need at least one user message")
    if getattr(tokenizer, "chat_template", None) is None:
        raise FailedPrecondition(
            "the base model has no chat template: send a plain prompt instead of messages"
        )
    text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": r, "content": c} for r, c in messages],
        tokenize=False,
        add_generation_prompt=True,
    )
    return RenderedPrompt(text, users[-1], chat=True)


@dataclass(frozen=True)
class GenerationStream:
    """The chosen router (for the first message) and the engine's events."""

    chosen: Chosen
    events: AsyncGenerator[GenerationEvent, None]  # aclose() it to cancel the request
    started: float


async def generate(
    service: InferenceService,
    prompt: str,
    messages: Sequence[tuple[str, str]],
    sampling: SamplingParams,
    method: str,
    version: int,
    expert_filter: Sequence[str],
    top_k: int,
    aggregation: Aggregation | None,
    composition: str = "",
    composition_version: int = 0,
) -> GenerationStream:
    """Check, route and queue one request; events come from the returned stream.

    ``composition`` pins a stored few-shot composition (its signed linear merge) instead of
    routing.
    """
    started = time.perf_counter()
    engine = service.engine
    if not engine.is_causal_lm:
        raise FailedPrecondition(
            "this coordinator serves a classification model; Generate needs one started with "
            "task_type causal_lm (use Predict for classification)"
        )
    rendered = render_prompt(engine.tokenizer, prompt, messages, service.config.max_input_chars)
    if composition:
        info = await service.composition(composition, composition_version)
        plan = composition_plan(info.expert_ids, info.weights, 1)
        chosen = Chosen(None, 0, f"composition {info.name} v{info.version}")
    else:
        # remembered per request shape while the registry is unchanged, as for Predict: a
        # burst of requests does not each read the router versions on a thread of its own
        chosen = await service.chosen(method, version, expert_filter)
        router = chosen.router
        assert router is not None  # choose() always picks one; only a composition has none
        plan = RoutingPlan.routed(router, service._top_k(router, top_k), aggregation)
    mailbox = _mailbox(asyncio.get_running_loop())
    queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()

    def sink(event: GenerationEvent) -> None:  # the scheduler's thread
        mailbox.post(queue, event)

    request = GenerationRequest(
        prompt=rendered.text,
        routing_text=rendered.routing_text,
        sampling=sampling,
        sink=sink,
        plan=plan,
        chat=rendered.chat,
    )
    try:
        engine.scheduler.submit(request)
    except QueueFull as exc:
        raise ResourceExhausted(str(exc)) from None
    return GenerationStream(chosen, _events(request, queue), started)


class _Mailbox:
    """Events from the scheduler's thread to one event loop, with one wake-up per burst.

    A decode step produces an event for every running stream at once; waking the loop once per
    event (``call_soon_threadsafe`` each) would cost 32 wake-ups per step at 32 streams, each
    taking the GIL from the decode loop. The first event of a burst schedules one drain; the
    others join the pending list until it runs.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: list[tuple[asyncio.Queue[GenerationEvent], GenerationEvent]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue[GenerationEvent], event: GenerationEvent) -> None:
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody listens
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for queue, event in pending:
            queue.put_nowait(event)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = (
    weakref.WeakKeyDictionary()
)


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    """The loop's mailbox (called on the loop's thread)."""
    box = _MAILBOXES.get(loop)
    if box is None:
        box = _MAILBOXES[loop] = _Mailbox(loop)
    return box


async def _events(
    request: GenerationRequest, queue: asyncio.Queue[GenerationEvent]
) -> AsyncGenerator[GenerationEvent, None]:
    try:
        while True:
            event = await queue.get()
            if isinstance(event, TextDelta):
                event, after = _coalesce(event, queue)
                yield event
                if after is None:
                    continue
                event = after
            if isinstance(event, GenerationFailed):
                raise event.error
            yield event
            if isinstance(event, GenerationFinished):
                return
    finally:
        request.cancel()  # a no-op when finished; frees the rows when the caller left early


def _coalesce(
    delta: TextDelta, queue: asyncio.Queue[GenerationEvent]
) -> tuple[TextDelta, GenerationEvent | None]:
    """``delta`` joined with the text deltas already waiting behind it, and the first other
    event taken from the queue (``None`` if none).

    A stream whose writer falls behind the decode loop (a slow client, a busy event loop)
    then sends one message per write instead of one per token: the text is the same, and the
    per-message cost stops growing with the backlog.
    """
    texts, tokens = [delta.text], delta.tokens
    while True:
        try:
            event = queue.get_nowait()
        except asyncio.QueueEmpty:
            return TextDelta("".join(texts), tokens), None
        if not isinstance(event, TextDelta):
            return TextDelta("".join(texts), tokens), event
        texts.append(event.text)
        tokens += event.tokens
