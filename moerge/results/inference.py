"""Results of the inference calls: predictions, routing decisions, the events of a streamed
generation and of a composition search, and what a request may name (``ListModels``)."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from moerge.results.base import Result, scalars, utc_time
from moerge.v1 import inference_pb2


@dataclasses.dataclass(frozen=True)
class ExpertWeight(Result):
    """One expert chosen for an input and its weight."""

    expert_id: str
    expert_name: str
    weight: float


def weights_of(items: Any) -> tuple[ExpertWeight, ...]:
    """Expert weights of the protobuf ``ExpertWeight`` messages ``items``."""
    return tuple(scalars(ExpertWeight, w) for w in items)


@dataclasses.dataclass(frozen=True)
class LabelScore(Result):
    """One label's probability in an expert's output."""

    label: str
    probability: float


@dataclasses.dataclass(frozen=True)
class ExpertOutput(Result):
    """One chosen expert's own answer."""

    expert_id: str
    scores: tuple[LabelScore, ...]
    text: str


@dataclasses.dataclass(frozen=True)
class Prediction(Result):
    """The routed answer to one input, with the experts behind it."""

    output: str  # the predicted label or the generated text
    confidence: float
    experts: tuple[ExpertWeight, ...]  # chosen experts and weights (token level: mean weight)
    expert_outputs: tuple[ExpertOutput, ...]

    @classmethod
    def from_proto(cls, m: inference_pb2.Prediction) -> Prediction:
        """The result of the protobuf message ``m``."""
        outputs = tuple(
            ExpertOutput(o.expert_id, tuple(scalars(LabelScore, s) for s in o.scores), o.text)
            for o in m.expert_outputs
        )
        return cls(m.output, m.confidence, weights_of(m.experts), outputs)


@dataclasses.dataclass(frozen=True)
class Predictions(Result):
    """The answers to a ``Predict`` call's inputs, and which router chose the experts."""

    predictions: tuple[Prediction, ...]  # one per input, in order
    router_version: int  # 0 when no trained router was used
    routing_method: str
    aggregation: str
    note: str  # e.g. why a fallback router was used
    latency_ms: float

    @classmethod
    def from_proto(cls, m: inference_pb2.PredictResponse) -> Predictions:
        """The result of the protobuf message ``m``."""
        return scalars(cls, m, predictions=tuple(Prediction.from_proto(p) for p in m.predictions))


@dataclasses.dataclass(frozen=True)
class Routing(Result):
    """The routing decisions for a ``Route`` call's inputs (no model output)."""

    decisions: tuple[tuple[ExpertWeight, ...], ...]  # per input: the chosen experts
    router_version: int
    routing_method: str
    note: str
    latency_ms: float

    @classmethod
    def from_proto(cls, m: inference_pb2.RouteResponse) -> Routing:
        """The result of the protobuf message ``m``."""
        return scalars(cls, m, decisions=tuple(weights_of(d.experts) for d in m.decisions))


@dataclasses.dataclass(frozen=True)
class GenerateStart(Result):
    """First event: who serves the request (token-level routers name experts only at the end)."""

    experts: tuple[ExpertWeight, ...]
    router_version: int
    routing_method: str
    aggregation: str
    note: str
    prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class GenerateDelta(Result):
    """Text produced since the previous event."""

    text: str
    tokens: int


@dataclasses.dataclass(frozen=True)
class GenerateEnd(Result):
    """Last event: why it stopped ("stop" or "length"), token counts and timings."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    experts: tuple[ExpertWeight, ...]
    confidence: float
    time_to_first_token_ms: float
    latency_ms: float


GenerateEvent = GenerateStart | GenerateDelta | GenerateEnd


def generate_event(response: Any) -> GenerateEvent:
    """One ``GenerateResponse`` of the stream as its event."""
    kind = response.WhichOneof("event")
    message = getattr(response, kind)
    if kind == "delta":
        return scalars(GenerateDelta, message)
    experts = tuple(scalars(ExpertWeight, w) for w in message.experts)
    cls = GenerateStart if kind == "start" else GenerateEnd
    fields = {f: getattr(message, f) for f in cls.__dataclass_fields__ if f != "experts"}
    return cls(experts=experts, **fields)


@dataclasses.dataclass(frozen=True)
class ComposeProgress(Result):
    """A composition search after ``evaluations`` of at most ``budget`` loss evaluations."""

    evaluations: int
    budget: int
    best_loss: float  # mean cross-entropy on the examples of the best weights so far
    elapsed_s: float


@dataclasses.dataclass(frozen=True)
class Composition(Result):
    """A stored few-shot composition: signed merge weights of experts (``experts[i].weight``)."""

    name: str
    version: int
    experts: tuple[ExpertWeight, ...]
    label_names: tuple[str, ...]
    loss: float  # on the examples, without the L1 penalty
    start_loss: float  # of the uniform merge the search started from
    evaluations: int
    elapsed_s: float
    stopped_by: str  # "budget" or "time"
    example_count: int
    examples_kept: bool
    created_by: str
    created_at: str

    @classmethod
    def from_proto(cls, m: inference_pb2.Composition) -> Composition:
        """The result of the protobuf message ``m``."""
        return scalars(cls, m, experts=weights_of(m.experts), label_names=tuple(m.label_names))


ComposeEvent = ComposeProgress | Composition


def compose_event(response: Any) -> ComposeEvent:
    """One ``ComposeResponse`` of the stream as its event."""
    if response.WhichOneof("event") == "progress":
        return scalars(ComposeProgress, response.progress)
    return Composition.from_proto(response.composition)


@dataclasses.dataclass(frozen=True)
class ServedExpert(Result):
    """An active expert as any inference caller sees it (``Client.models``)."""

    expert_id: str
    name: str
    version: int
    task_name: str
    task_type: str  # "classification" or "causal_lm"
    label_names: tuple[str, ...]
    contributor_id: str
    created_at: datetime | None

    @classmethod
    def from_proto(cls, m: inference_pb2.ServedExpert) -> ServedExpert:
        """The result of the protobuf message ``m``."""
        return scalars(cls, m, label_names=tuple(m.label_names), created_at=utc_time(m.created_at))


@dataclasses.dataclass(frozen=True)
class ServedRouter(Result):
    """A routing method that ``method=`` serves, with its newest ready router version."""

    method: str
    version: int


@dataclasses.dataclass(frozen=True)
class Models(Result):
    """What a request may name: active experts, routing methods, compositions (``ListModels``)."""

    experts: tuple[ServedExpert, ...]
    routers: tuple[ServedRouter, ...]
    active_router_version: int  # 0: no router trained yet (a fallback router is fitted)
    active_router_method: str
    compositions: tuple[Composition, ...]  # the newest version of each name

    @classmethod
    def from_proto(cls, m: inference_pb2.ListModelsResponse) -> Models:
        """The result of the protobuf message ``m``."""
        return cls(
            experts=tuple(ServedExpert.from_proto(e) for e in m.experts),
            routers=tuple(scalars(ServedRouter, r) for r in m.routers),
            active_router_version=m.active_router_version,
            active_router_method=m.active_router_method,
            compositions=tuple(Composition.from_proto(c) for c in m.compositions),
        )
