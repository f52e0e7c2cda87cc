"""HTTP requests -> the gRPC API's own handlers -> OpenAI-shaped (or moerge JSON) responses.

Nothing here serves a request itself: a body becomes the request message the gRPC servicers
receive (``GenerateRequest``, ``PredictRequest``, ``RouteRequest``) and goes to the same plain
handler (:mod:`moerge.coordinator.rpc.inference_handler`) in this event loop, so checks, limits,
routing and batching are those of gRPC, and a completion, a gRPC ``Generate`` and a
``moerge.Client`` call with the same settings give the same text. What is HTTP's own:

* ``model``: ``"moerge"`` (or a routing method's name) lets the router choose; an expert's id,
  ``"name vN"`` or name pins that expert, as ``expert_ids=[id]`` would (LoRAX/vLLM pick an adapter
  with ``model=`` the same way); ``"composition/NAME"`` (or ``".../vN"``) serves a stored few-shot
  composition, as the ``composition`` field of gRPC ``Predict``/``Generate`` does.
  ``GET /v1/models`` lists every such name, from gRPC ``ListModels``.
* OpenAI's sampling defaults: ``temperature`` is 1.0 when absent (gRPC's is 0, greedy);
  ``max_tokens`` absent is the coordinator's ``max_new_tokens``. Fields moerge cannot honour
  (``n`` > 1, non-zero ``frequency_penalty``/``presence_penalty``, ``logprobs``, ``logit_bias``,
  ``echo``, ``best_of``, ``suffix``, ``tools``, a ``response_format``) are refused with 400.
* Streaming: each event of the handler's stream becomes one OpenAI chunk (``data: {...}``),
  then ``data: [DONE]``. The stream is closed when the client goes away, which cancels the
  request in the scheduler (see :mod:`moerge.coordinator.inference.generation_service`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from moerge.coordinator.http import protocol as api
from moerge.coordinator.http.errors import ApiError
from moerge.coordinator.rpc import inference_handler, models_handler
from moerge.coordinator.rpc.inference_handler import MAX_NEW_TOKENS
from moerge.coordinator.state import CoordinatorState
from moerge.refusals import InvalidArgument, NotFound
from moerge.results import AGGREGATIONS, Predictions
from moerge.results import Routing as RoutingResult
from moerge.router_training.methods import available_methods
from moerge.storage.records import ExpertInfo, Principal
from moerge.storage.validation import MAX_INT32
from moerge.v1 import common_pb2, inference_pb2

P = ParamSpec("P")
R = TypeVar("R")


def refusals(call: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn any error of ``call`` into the :class:`ApiError` its gRPC status maps to."""

    @functools.wraps(call)
    async def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await call(*args, **kwargs)
        except ApiError:
            raise
        except Exception as exc:
            raise ApiError.of(exc) from None

    return wrapped


def _message(factory: Callable[..., R], **fields: Any) -> R:
    """A protobuf request; out-of-range numbers (int32, int64) are the caller's error."""
    try:
        return factory(**fields)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument("request", str(exc)) from None


def _aggregation(word: str) -> int:
    if word not in AGGREGATIONS:
        raise InvalidArgument("aggregation", f"must be one of {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[word]


# -- models ---------------------------------------------------------------------------------
@refusals
async def list_models(state: CoordinatorState, started: float) -> api.ModelList:
    """gRPC ``ListModels`` as OpenAI's model list: the routed model, then every routing method
    with a trained router, every active expert and every servable composition."""
    models = await asyncio.to_thread(models_handler.models, state)
    routed = api.ModelCard(
        id=api.ROUTED_MODEL,
        created=int(started),
        owned_by="moerge",
        root=api.ROUTED_MODEL,
        moerge={
            "kind": "routed",
            "router_version": models.active_router_version,
            "routing_method": models.active_router_method,
        },
    )
    routers = [
        api.ModelCard(
            id=r.method,
            created=int(started),
            owned_by="moerge",
            root=r.method,
            moerge={"kind": "router", "version": r.version},
        )
        for r in models.routers
    ]
    experts = [
        api.ModelCard(
            id=e.expert_id,
            created=e.created_at.seconds,
            owned_by=e.contributor_id,
            root=e.expert_id,
            moerge={
                "kind": "expert",
                "name": e.name,
                "version": e.version,
                "task_name": e.task_name,
            },
        )
        for e in models.experts
    ]
    compositions = [
        api.ModelCard(
            id=api.COMPOSITION_PREFIX + c.name,
            created=int(datetime.fromisoformat(c.created_at).timestamp()),
            owned_by=c.created_by,
            root=f"{api.COMPOSITION_PREFIX}{c.name}/v{c.version}",
            moerge={
                "kind": "composition",
                "name": c.name,
                "version": c.version,
                "experts": [_weight(w).model_dump() for w in c.experts],
            },
        )
        for c in models.compositions
    ]
    return api.ModelList(data=[routed, *routers, *experts, *compositions])


def _pinned(model: str, experts: Sequence[ExpertInfo]) -> ExpertInfo:
    """The active expert ``model`` names: its id, ``"name vN"``, or a name (newest version)."""
    for expert in experts:
        if model in (expert.id, f"{expert.name} v{expert.version}"):
            return expert
    named = [e for e in experts if e.name == model]
    if len({e.contributor_id for e in named}) > 1:
        raise InvalidArgument(
            "model",
            f"{model!r} names experts of several contributors; use one id: "
            + ", ".join(e.id for e in named),
        )
    if not named:
        raise NotFound(f"model {model!r} is not served; GET /v1/models lists the models")
    return max(named, key=lambda e: e.version)


def _composition(model: str) -> tuple[str, int]:
    """``"composition/NAME"`` -> (NAME, 0: newest); ``"composition/NAME/vN"`` -> (NAME, N)."""
    name, _, version = model.removeprefix(api.COMPOSITION_PREFIX).partition("/")
    if not name or (version and not (version[:1] == "v" and version[1:].isdigit())):
        raise InvalidArgument(
            "model", 'a composition is "composition/NAME" or "composition/NAME/vN"'
        )
    number = int(version[1:]) if version else 0
    if not 0 <= number <= MAX_INT32:
        raise InvalidArgument("model", f"composition version must be in 1..{MAX_INT32}")
    return name, number


async def _routing(model: str, routing: api.Routing, state: CoordinatorState) -> api.Routing:
    """``routing`` with what ``model`` says: the router's choice, a method, one expert, or a
    composition."""
    if model in ("", api.ROUTED_MODEL):
        return routing
    if model.startswith(api.COMPOSITION_PREFIX):
        name, version = _composition(model)
        if routing.composition not in ("", name):
            raise InvalidArgument(
                "model", f"names composition {name!r}, moerge.composition {routing.composition!r}"
            )
        return routing.model_copy(update={"composition": name, "composition_version": version})
    if model in available_methods():
        if routing.routing_method not in ("", model):
            raise InvalidArgument(
                "model", f"names method {model!r}, moerge.routing_method {routing.routing_method!r}"
            )
        return routing.model_copy(update={"routing_method": model})
    expert = _pinned(model, await asyncio.to_thread(models_handler.active_experts, state))
    if routing.expert_ids not in ([], [expert.id]):
        raise InvalidArgument("model", "pins one expert; leave moerge.expert_ids empty")
    return routing.model_copy(update={"expert_ids": [expert.id]})


# -- predict and route ------------------------------------------------------------------------
@refusals
async def predict(
    body: api.InputsRequest, state: CoordinatorState, principal: Principal
) -> api.PredictResponse:
    """POST /v1/predict: the body as a PredictRequest, answered by the gRPC handler, in JSON."""
    request = _message(
        inference_pb2.PredictRequest,
        inputs=body.inputs,
        top_k=body.top_k,
        routing_method=body.routing_method,
        expert_ids=body.expert_ids,
        aggregation=_aggregation(body.aggregation),
        router_version=body.router_version,
        max_new_tokens=body.max_new_tokens,
        composition=body.composition,
        composition_version=body.composition_version,
    )
    response = await inference_handler.predict(request, state, principal)
    return api.PredictResponse.model_validate(Predictions.from_proto(response).to_dict())


@refusals
async def route(
    body: api.InputsRequest, state: CoordinatorState, principal: Principal
) -> api.RouteResponse:
    """POST /v1/route: the routing decision alone; generation and composition fields are refused."""
    if body.aggregation != "default" or body.max_new_tokens:
        raise InvalidArgument("aggregation", "and max_new_tokens are for /v1/predict")
    if body.composition or body.composition_version:
        raise InvalidArgument(
            "composition",
            "does not route: its fixed expert weights are in "
            "GET /v1/models; use /v1/predict to serve it",
        )
    request = _message(
        inference_pb2.RouteRequest,
        inputs=body.inputs,
        top_k=body.top_k,
        routing_method=body.routing_method,
        expert_ids=body.expert_ids,
        router_version=body.router_version,
    )
    response = await inference_handler.route(request, state, principal)
    return api.RouteResponse.model_validate(RoutingResult.from_proto(response).to_dict())


# -- completions ------------------------------------------------------------------------------
def _refuse_unsupported(body: api.SamplingRequest) -> None:
    """A field moerge would have to ignore is an error, not a silent surprise."""
    if body.n != 1:
        raise InvalidArgument("n", "only 1 choice per request is supported")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise InvalidArgument(name, "is not supported (only 0); repetition_penalty is")
    unsupported = {"logit_bias": bool(body.logit_bias)}
    if isinstance(body, api.CompletionRequest):
        unsupported.update(
            echo=body.echo,
            logprobs=body.logprobs is not None,
            best_of=body.best_of not in (None, 1),
            suffix=body.suffix is not None,
        )
    if isinstance(body, api.ChatCompletionRequest):
        unsupported.update(
            logprobs=body.logprobs,
            tools=bool(body.tools),
            response_format=body.response_format not in (None, {"type": "text"}),
        )
    for name, used in unsupported.items():
        if used:
            raise InvalidArgument(name, "is not supported by moerge")


def _sampling(body: api.SamplingRequest) -> inference_pb2.SamplingParams:
    """OpenAI's sampling fields as the gRPC message (checked again by the handler)."""
    _refuse_unsupported(body)
    max_tokens = body.max_tokens
    if isinstance(body, api.ChatCompletionRequest) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    if max_tokens is not None and not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise InvalidArgument("max_tokens", f"must be in 1..{MAX_NEW_TOKENS}")
    optional = {
        "top_p": body.top_p,
        "seed": body.seed,
        "repetition_penalty": body.repetition_penalty,
    }
    return _message(
        inference_pb2.SamplingParams,
        max_new_tokens=max_tokens or 0,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k or 0,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or ()),
        **{name: value for name, value in optional.items() if value is not None},
    )


def _prompt(body: api.CompletionRequest) -> str:
    if isinstance(body.prompt, str):
        return body.prompt
    if len(body.prompt) != 1:
        raise InvalidArgument("prompt", "give one prompt per request")
    return body.prompt[0]


def _messages(body: api.ChatCompletionRequest) -> list[inference_pb2.ChatMessage]:
    return [
        inference_pb2.ChatMessage(
            role=m.role,
            content=m.content
            if isinstance(m.content, str)
            else "\n".join(part.text for part in m.content),
        )
        for m in body.messages
    ]


@dataclass
class Generation:
    """A started generation: its first event (who serves it) and the rest of the handler's."""

    id: str
    created: int
    model: str
    start: inference_pb2.GenerateStart
    events: AsyncGenerator[inference_pb2.GenerateResponse, None]
    include_usage: bool

    @property
    def head(self) -> dict[str, Any]:
        """The fields every response and chunk of this generation starts with."""
        return {"id": self.id, "created": self.created, "model": self.model}

    def routing(self, end: inference_pb2.GenerateEnd | None = None) -> api.RoutingInfo:
        """The routing decision; with ``end``, its experts (token-level routers: only there)."""
        start = self.start
        info = api.RoutingInfo(
            experts=[_weight(w) for w in (end.experts if end and end.experts else start.experts)],
            router_version=start.router_version,
            routing_method=start.routing_method,
            aggregation=start.aggregation,
            note=start.note,
        )
        if end is not None:
            info.confidence = end.confidence
            info.time_to_first_token_ms = end.time_to_first_token_ms
            info.latency_ms = end.latency_ms
        return info

    async def collect(self) -> tuple[str, inference_pb2.GenerateEnd]:
        """The whole text and the last event (a non-streamed answer)."""
        texts = []
        async with contextlib.aclosing(self.events) as events:
            async for event in events:
                if event.HasField("delta"):
                    texts.append(event.delta.text)
                elif event.HasField("end"):
                    return "".join(texts), event.end
        raise RuntimeError("the generation stream ended without its last event")


def _weight(w: common_pb2.ExpertWeight) -> api.ExpertWeight:
    return api.ExpertWeight(expert_id=w.expert_id, expert_name=w.expert_name, weight=w.weight)


def _usage(end: inference_pb2.GenerateEnd) -> api.Usage:
    return api.Usage(
        prompt_tokens=end.prompt_tokens,
        completion_tokens=end.completion_tokens,
        total_tokens=end.prompt_tokens + end.completion_tokens,
    )


async def _start(
    body: api.SamplingRequest,
    state: CoordinatorState,
    principal: Principal,
    prefix: str,
    **prompt: Any,
) -> Generation:
    """Route and queue the request; refusals surface here, before any byte is sent."""
    routing = await _routing(body.model, body.moerge, state)
    request = _message(
        inference_pb2.GenerateRequest,
        sampling=_sampling(body),
        top_k=routing.top_k,
        routing_method=routing.routing_method,
        expert_ids=routing.expert_ids,
        aggregation=_aggregation(routing.aggregation),
        router_version=routing.router_version,
        composition=routing.composition,
        composition_version=routing.composition_version,
        **prompt,
    )
    events = inference_handler.generate(request, state, principal)
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()
        raise
    return Generation(
        id=f"{prefix}-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=body.model,
        start=first.start,
        events=events,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )


@refusals
async def completion(
    body: api.CompletionRequest, state: CoordinatorState, principal: Principal
) -> api.CompletionResponse | StreamingResponse:
    """POST /v1/completions: one generation, whole or streamed as server-sent events."""
    generation = await _start(body, state, principal, "cmpl", prompt=_prompt(body))
    if body.stream:
        return EventStream(_chunks(generation, api.CompletionResponse, _text_choice))
    text, end = await generation.collect()
    return api.CompletionResponse(
        **generation.head,
        choices=[_text_choice(text, end.finish_reason)],
        usage=_usage(end),
        moerge=generation.routing(end),
    )


@refusals
async def chat_completion(
    body: api.ChatCompletionRequest, state: CoordinatorState, principal: Principal
) -> api.ChatCompletionResponse | StreamingResponse:
    """POST /v1/chat/completions: one generation from the messages, whole or streamed as server-sent
    events."""
    generation = await _start(body, state, principal, "chatcmpl", messages=_messages(body))
    if body.stream:
        return EventStream(_chunks(generation, api.ChatCompletionChunk, _delta_choice))
    text, end = await generation.collect()
    choice = api.ChatChoice(
        message=api.AssistantMessage(content=text), finish_reason=end.finish_reason
    )
    return api.ChatCompletionResponse(
        **generation.head,
        choices=[choice],
        usage=_usage(end),
        moerge=generation.routing(end),
    )


def _text_choice(text: str | None, finish_reason: str | None) -> api.CompletionChoice:
    return api.CompletionChoice(text=text or "", finish_reason=finish_reason)


def _delta_choice(text: str | None, finish_reason: str | None) -> api.ChatChunkChoice:
    """The first chunk names the role (``text`` None), the last one carries no content."""
    if text is None:
        delta = api.DeltaMessage(role="assistant", content="")
    else:
        delta = api.DeltaMessage(content=text or None)
    return api.ChatChunkChoice(delta=delta, finish_reason=finish_reason)


async def _chunks(
    generation: Generation,
    kind: type[api.CompletionResponse] | type[api.ChatCompletionChunk],
    choice: Callable[[str | None, str | None], Any],
) -> AsyncGenerator[BaseModel, None]:
    """One chunk per event: the start (with the routing), each delta, the end (finish reason,
    final routing), then the usage alone when ``stream_options.include_usage`` asks, as OpenAI."""
    head = generation.head
    yield kind(**head, choices=[choice(None, None)], moerge=generation.routing())
    async with contextlib.aclosing(generation.events) as events:
        async for event in events:
            if event.HasField("delta"):
                yield kind(**head, choices=[choice(event.delta.text, None)])
            elif event.HasField("end"):
                yield kind(
                    **head,
                    choices=[choice("", event.end.finish_reason)],
                    moerge=generation.routing(event.end),
                )
                if generation.include_usage:
                    yield kind(**head, choices=[], usage=_usage(event.end))


async def _server_sent_events(chunks: AsyncGenerator[BaseModel, None]) -> AsyncGenerator[str, None]:
    """``data: {chunk}`` per chunk, then ``data: [DONE]``; a late error is an error event."""
    try:
        try:
            async for item in chunks:
                yield f"data: {item.model_dump_json(exclude_none=True)}\n\n"
        except Exception as exc:  # the 200 is sent: say it in the stream, as OpenAI does
            yield f"data: {json.dumps(ApiError.of(exc).body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await chunks.aclose()  # the client left: cancel the request (frees its rows)


class EventStream(StreamingResponse):
    """``text/event-stream`` whose iterator is closed however the response ends.

    Starlette stops iterating when the client disconnects (a disconnect message, or a failed
    send) but may leave the iterator to the garbage collector; closing it here cancels the
    generation at once.
    """

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncGenerator[BaseModel, None]) -> None:
        self._events = _server_sent_events(chunks)
        super().__init__(self._events, headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the stream, then close its iterator however the response ended."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
