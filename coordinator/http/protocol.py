"""Pydantic models of the HTTP API's requests and responses (OpenAI's shapes, plus ``moerge``).

The completion models follow OpenAI's ``/v1/completions`` and ``/v1/chat/completions`` (and
vLLM's ``protocol.py``): fields the coordinator cannot honour are accepted by name so that a
request using them is refused with a clear 400 (see :mod:`.serving`) rather than silently
ignored. Routing is chosen with ``model`` or the ``moerge`` extension object (the ``openai``
package sends it with ``extra_body={"moerge": {...}}``); every response says how it was routed
in its own ``moerge`` object. ``/v1/predict`` and ``/v1/route`` mirror the gRPC
``PredictRequest``/``RouteRequest``; their responses are the JSON of :mod:`moerge.results`, the
same values ``moerge.Client`` returns.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ROUTED_MODEL = "moerge"  # the model name that lets the router choose
#: ``model="composition/NAME"`` (newest version) or ``"composition/NAME/vN"`` serves a stored
#: few-shot composition; names hold no "/", so this never collides with an expert's name
COMPOSITION_PREFIX = "composition/"


class Routing(BaseModel):
    """How to route (the ``moerge`` extension, and the body of ``/v1/predict``/``/v1/route``)."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(0, description="experts per input; 0: the router's default")
    routing_method: str = Field("", description='"": the active router; else a method name')
    expert_ids: list[str] = Field(
        default_factory=list, description="restrict routing to these active experts"
    )
    router_version: int = Field(0, description="0: the active version")
    aggregation: str = Field(
        "default", description="default, ensemble, merge, ties, dare or mix (as the CLI)"
    )
    composition: str = Field(
        "", description="serve this few-shot composition instead of routing (no router field)"
    )
    composition_version: int = Field(0, description="the composition's version; 0: newest")


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What completions and chat completions share: model, sampling, streaming, routing."""

    model: str = ROUTED_MODEL
    max_tokens: int | None = None  # None: the coordinator's max_new_tokens
    temperature: float | None = None  # None: 1.0, OpenAI's default
    top_p: float | None = None
    top_k: int | None = None  # token top-k, as vLLM's extension (not experts: moerge.top_k)
    repetition_penalty: float | None = None  # vLLM's extension
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as a caller's own label
    moerge: Routing = Field(default_factory=Routing)


class CompletionRequest(SamplingRequest):
    """The body of ``/v1/completions``; ``echo``, ``logprobs``, ``best_of`` and ``suffix`` are named
    only to be refused."""

    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    """One text part of a chat message's content (the only kind of part accepted)."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message: a role and its text, or its text parts."""

    role: str
    content: str | list[TextPart]


class ChatCompletionRequest(SamplingRequest):
    """The body of ``/v1/chat/completions``; ``logprobs``, ``tools`` and ``response_format`` are
    named only to be refused."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    tools: list[dict] | None = None
    response_format: dict | None = None


# -- responses --------------------------------------------------------------------------------
class ExpertWeight(BaseModel):
    """One expert of a routing decision and its weight."""

    expert_id: str
    expert_name: str  # "name vN"
    weight: float


class RoutingInfo(BaseModel):
    """The ``moerge`` object of a completion: which experts answered and why."""

    experts: list[ExpertWeight]
    router_version: int
    routing_method: str
    aggregation: str = ""
    note: str = ""
    confidence: float | None = None  # with the last event only
    time_to_first_token_ms: float | None = None
    latency_ms: float | None = None


class Usage(BaseModel):
    """Token counts of a generation, as OpenAI reports them."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    """The generated text of a completion and why it stopped."""

    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class Envelope(BaseModel):
    """What every completion and chunk starts with."""

    id: str
    created: int  # Unix seconds
    model: str  # as the request named it


class CompletionResponse(Envelope):
    """A completion, or (``object="text_completion"`` too, as OpenAI) one streamed chunk."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None
    moerge: RoutingInfo | None = None


class AssistantMessage(BaseModel):
    """The generated reply of a chat completion."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """A chat completion's reply and why it stopped."""

    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionResponse(Envelope):
    """A whole chat completion, with its usage and routing."""

    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    moerge: RoutingInfo


class DeltaMessage(BaseModel):
    """The text a chat completion chunk adds (the role only in the first)."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    """One streamed chat completion chunk's delta, and at the end why it stopped."""

    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Envelope):
    """One server-sent event of a streamed chat completion."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    moerge: RoutingInfo | None = None


class ModelCard(BaseModel):
    """One ``model=`` value: the routed model, a routing method, an expert, a composition.

    ``moerge.kind`` says which (``routed``, ``router``, ``expert``, ``composition``); the rest
    of ``moerge`` describes it (an expert's name, version and task; a composition's version and
    signed expert weights; a router's version).
    """

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str  # what the id resolves to now: an expert id, "composition/NAME/vN", a method
    moerge: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    """The answer of ``/v1/models``: what ``model`` may name."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class InputsRequest(Routing):
    """``/v1/predict`` and ``/v1/route``: a batch of texts and how to route them."""

    inputs: list[str]
    max_new_tokens: int = Field(0, description="causal LM predict only; 0: the default")


class LabelScore(BaseModel):
    """One label's probability in an expert's output."""

    label: str
    probability: float


class ExpertOutput(BaseModel):
    """One expert's output for an input: its label scores, or its generated text."""

    expert_id: str
    scores: list[LabelScore]
    text: str


class Prediction(BaseModel):
    """The aggregated answer for one input, with the routing and each expert's output."""

    output: str
    confidence: float
    experts: list[ExpertWeight]
    expert_outputs: list[ExpertOutput]


class PredictResponse(BaseModel):
    """The answer of ``/v1/predict``: a prediction per input and how they were routed."""

    predictions: list[Prediction]
    router_version: int
    routing_method: str
    aggregation: str
    note: str
    latency_ms: float


class RouteResponse(BaseModel):
    """The answer of ``/v1/route``: each input's routing decision."""

    decisions: list[list[ExpertWeight]]
    router_version: int
    routing_method: str
    note: str
    latency_ms: float


class ErrorInfo(BaseModel):
    """What went wrong, in OpenAI's error shape."""

    message: str
    type: str  # OpenAI's words: invalid_request_error, authentication_error, ...
    code: str  # the gRPC status code's name in lower case: invalid_argument, ...


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorInfo
