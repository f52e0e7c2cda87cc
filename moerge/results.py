"""Typed results of :class:`moerge.Client` calls: frozen dataclasses built from the gRPC messages.

Why not hand back the protobuf messages: their int64 fields turn into strings and their enums
into ``EXPERT_STATE_QUARANTINED`` in JSON, timestamps need ``ToDatetime()``, and an unset
sub-message reads as a default instance. Here numbers are numbers, enum values are the words
the CLI takes (``"quarantined"``, ``"ensemble"``), times are UTC ``datetime`` (``None`` when
unset), and :meth:`Result.to_dict` is what ``--json`` prints.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from moerge.v1 import common_pb2, inference_pb2

#: Expert states by the CLI's word for them (``moerge admin experts set-state ID quarantined``).
STATES = {
    "active": common_pb2.EXPERT_STATE_ACTIVE,
    "quarantined": common_pb2.EXPERT_STATE_QUARANTINED,
    "retired": common_pb2.EXPERT_STATE_RETIRED,
}
#: How the chosen experts are combined, by the CLI's word (``moerge predict --aggregation``).
AGGREGATIONS = {
    "default": inference_pb2.AGGREGATION_UNSPECIFIED,
    "ensemble": inference_pb2.AGGREGATION_OUTPUT_ENSEMBLE,
    "merge": inference_pb2.AGGREGATION_MERGE_LINEAR,
    "ties": inference_pb2.AGGREGATION_MERGE_TIES,
    "dare": inference_pb2.AGGREGATION_MERGE_DARE,
    "mix": inference_pb2.AGGREGATION_MODULE_MIX,
}
_STATE_WORDS = {number: word for word, number in STATES.items()}

T = TypeVar("T")


class Result:
    """Base of every result: :meth:`to_dict` gives JSON-ready values."""

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)  # type: ignore[return-value]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return value


def _time(stamp: Timestamp) -> datetime | None:
    if not (stamp.seconds or stamp.nanos):
        return None
    return stamp.ToDatetime(tzinfo=timezone.utc)


def _scalars(cls: type, message: Message, **given: Any) -> Any:
    """``cls`` with every field not in ``given`` copied from the message's field of that name."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in given]
    return cls(**{name: getattr(message, name) for name in names}, **given)


@dataclasses.dataclass(frozen=True)
class ExpertFile(Result):
    name: str
    sha256: str
    size: int


@dataclasses.dataclass(frozen=True)
class Privacy(Result):
    """The differential privacy a contributor applied to its statistics."""

    epsilon: float
    delta: float
    clip_norm: float


@dataclasses.dataclass(frozen=True)
class PrivacyRelease(Result):
    """One data-dependent part of an expert and how it was released."""

    what: str  # "statistics", "adapter" or "gates"
    mechanism: str  # "gaussian_pld", "dp_sgd", "none" (no DP), "external" (brought adapter)
    epsilon: float | None  # None when the release is not DP
    delta: float | None


@dataclasses.dataclass(frozen=True)
class PrivacyReport(Result):
    """What an expert releases about its contributor's data (docs/security.md)."""

    releases: tuple[PrivacyRelease, ...]
    all_dp: bool  # every release is DP: epsilon/delta cover the whole expert
    epsilon: float | None  # the DP releases composed; None when none is DP
    delta: float | None
    statistics_opt_out: bool  # the contributor turned the statistics' default DP off
    unit: str

    @classmethod
    def from_proto(cls, m: common_pb2.PrivacyReport) -> PrivacyReport:
        def release(r: common_pb2.PrivacyRelease) -> PrivacyRelease:
            dp = r.mechanism not in ("none", "external", "")
            return PrivacyRelease(
                r.what, r.mechanism, r.epsilon if dp else None, r.delta if dp else None
            )

        any_dp = m.epsilon > 0
        return cls(
            releases=tuple(release(r) for r in m.releases),
            all_dp=m.all_dp,
            epsilon=m.epsilon if any_dp else None,
            delta=m.delta if any_dp else None,
            statistics_opt_out=m.statistics_opt_out,
            unit=m.unit or "example",
        )

    def summary(self) -> str:
        """One line for a table cell: ``DP eps 4`` / ``not DP (opted out)`` / ..."""
        stats = next((r for r in self.releases if r.what == "statistics"), None)
        if stats is None or stats.epsilon is None:
            text = "statistics NOT DP" + (" (opted out)" if self.statistics_opt_out else "")
        else:
            text = f"statistics eps {stats.epsilon:g}"
        if self.all_dp and self.epsilon is not None:
            return f"all DP, eps {self.epsilon:.3g}"
        weights = [r.what for r in self.releases if r.what != "statistics" and r.epsilon is None]
        return text + (f"; {'+'.join(weights)} not DP" if weights else "")


@dataclasses.dataclass(frozen=True)
class Expert(Result):
    expert_id: str
    name: str
    version: int
    contributor_id: str
    task_name: str
    task_description: str
    task_type: str  # "classification" or "causal_lm"
    state: str  # "active", "quarantined" or "retired"
    state_reason: str
    base_model_id: str
    lora_rank: int
    target_modules: tuple[str, ...]
    label_names: tuple[str, ...]
    example_count: int
    files: tuple[ExpertFile, ...]
    privacy: Privacy | None  # None: the statistics carry no DP noise
    created_at: datetime | None
    content_sha256: str
    privacy_report: PrivacyReport | None = None  # what was released, under which (eps, delta)

    @classmethod
    def from_proto(cls, m: common_pb2.Expert) -> Expert:
        return _scalars(
            cls,
            m,
            state=_STATE_WORDS.get(m.state, "unspecified"),
            target_modules=tuple(m.target_modules),
            label_names=tuple(m.label_names),
            files=tuple(_scalars(ExpertFile, f) for f in m.files),
            privacy=_scalars(Privacy, m.privacy) if m.HasField("privacy") else None,
            created_at=_time(m.created_at),
            privacy_report=(
                PrivacyReport.from_proto(m.privacy_report) if m.HasField("privacy_report") else None
            ),
        )


@dataclasses.dataclass(frozen=True)
class Page(Result, Generic[T]):
    """One page of a list; pass ``next_page_token`` back for the next ("" on the last)."""

    items: tuple[T, ...]
    next_page_token: str


@dataclasses.dataclass(frozen=True)
class Joined(Result):
    contributor_id: str
    name: str
    credential: str  # shown once: the coordinator keeps only its hash
    config_path: Path | None  # where it was saved (None with ``save=False``)


@dataclasses.dataclass(frozen=True)
class NodeKeyRegistration(Result):
    """A SuperNode key the coordinator recorded; ``admitted``: its SuperLink lets the node in
    now (``flower_node_id`` is then Flower's id for it)."""

    node_key_id: str
    admitted: bool
    flower_node_id: int


@dataclasses.dataclass(frozen=True)
class BaseModel(Result):
    """What experts must be trained against (``GetBaseModel``)."""

    base_model_id: str
    revision: str  # sha256 over the base model's weight files
    allowed_target_modules: tuple[str, ...]
    max_lora_rank: int
    hidden_size: int
    task_type: str
    max_upload_bytes: int
    chunk_size: int

    @classmethod
    def from_proto(cls, m: Message) -> BaseModel:
        return _scalars(cls, m, allowed_target_modules=tuple(m.allowed_target_modules))


@dataclasses.dataclass(frozen=True)
class Upload(Result):
    expert: Expert
    created: bool  # False: identical content was already registered
    upload_id: str

    @classmethod
    def from_proto(cls, m: Message) -> Upload:
        return cls(Expert.from_proto(m.expert), m.created, m.upload_id)


@dataclasses.dataclass(frozen=True)
class ExpertWeight(Result):
    expert_id: str
    expert_name: str
    weight: float


def _weights(items: Any) -> tuple[ExpertWeight, ...]:
    return tuple(_scalars(ExpertWeight, w) for w in items)


@dataclasses.dataclass(frozen=True)
class LabelScore(Result):
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
    output: str  # the predicted label or the generated text
    confidence: float
    experts: tuple[ExpertWeight, ...]  # chosen experts and weights (token level: mean weight)
    expert_outputs: tuple[ExpertOutput, ...]

    @classmethod
    def from_proto(cls, m: inference_pb2.Prediction) -> Prediction:
        outputs = tuple(
            ExpertOutput(o.expert_id, tuple(_scalars(LabelScore, s) for s in o.scores), o.text)
            for o in m.expert_outputs
        )
        return cls(m.output, m.confidence, _weights(m.experts), outputs)


@dataclasses.dataclass(frozen=True)
class Predictions(Result):
    predictions: tuple[Prediction, ...]  # one per input, in order
    router_version: int  # 0 when no trained router was used
    routing_method: str
    aggregation: str
    note: str  # e.g. why a fallback router was used
    latency_ms: float

    @classmethod
    def from_proto(cls, m: inference_pb2.PredictResponse) -> Predictions:
        return _scalars(cls, m, predictions=tuple(Prediction.from_proto(p) for p in m.predictions))


@dataclasses.dataclass(frozen=True)
class Routing(Result):
    decisions: tuple[tuple[ExpertWeight, ...], ...]  # per input: the chosen experts
    router_version: int
    routing_method: str
    note: str
    latency_ms: float

    @classmethod
    def from_proto(cls, m: inference_pb2.RouteResponse) -> Routing:
        return _scalars(cls, m, decisions=tuple(_weights(d.experts) for d in m.decisions))


@dataclasses.dataclass(frozen=True)
class RouterVersion(Result):
    version: int
    method: str
    status: str  # "training", "ready" or "failed"
    active: bool
    params_json: str
    expert_ids: tuple[str, ...]
    artifact_sha256: str
    artifact_size: int
    metrics: dict[str, float]
    error: str
    trigger: str  # "manual", "expert_change", "periodic", ...
    created_at: datetime | None
    fit_seconds: float

    @classmethod
    def from_proto(cls, m: Message) -> RouterVersion:
        return _scalars(
            cls,
            m,
            expert_ids=tuple(m.expert_ids),
            metrics=dict(m.metrics),
            created_at=_time(m.created_at),
        )


@dataclasses.dataclass(frozen=True)
class Contributor(Result):
    contributor_id: str
    name: str
    created_at: datetime | None
    revoked: bool
    revoke_reason: str
    expert_count: int

    @classmethod
    def from_proto(cls, m: Message) -> Contributor:
        return _scalars(cls, m, created_at=_time(m.created_at))


@dataclasses.dataclass(frozen=True)
class EnrollmentToken(Result):
    token_id: str
    token: str  # shown once
    expires_at: datetime | None  # None: never
    max_uses: int

    @classmethod
    def from_proto(cls, m: Message) -> EnrollmentToken:
        return _scalars(cls, m, expires_at=_time(m.expires_at))


@dataclasses.dataclass(frozen=True)
class EnrollmentTokenInfo(Result):
    """An enrollment token as ``admin tokens list`` shows it (its secret is never shown again)."""

    token_id: str
    note: str
    created_by: str
    created_at: datetime | None
    expires_at: datetime | None  # None: never
    max_uses: int
    uses: int
    revoked: bool

    @classmethod
    def from_proto(cls, m: Message) -> EnrollmentTokenInfo:
        return _scalars(cls, m, created_at=_time(m.created_at), expires_at=_time(m.expires_at))


@dataclasses.dataclass(frozen=True)
class ApiKey(Result):
    """A user's inference-only API key (its secret is shown once, by :class:`CreatedApiKey`)."""

    key_id: str
    note: str
    created_by: str
    created_at: datetime | None
    expires_at: datetime | None  # None: never
    rate_limit_per_minute: int  # 0: the coordinator's inference_requests_per_minute
    revoked: bool
    last_used_at: datetime | None

    @classmethod
    def from_proto(cls, m: Message) -> ApiKey:
        return _scalars(
            cls,
            m,
            created_at=_time(m.created_at),
            expires_at=_time(m.expires_at),
            last_used_at=_time(m.last_used_at),
        )


@dataclasses.dataclass(frozen=True)
class CreatedApiKey(Result):
    key: ApiKey
    api_key: str  # shown once: pass it as the token (Authorization: Bearer) of inference calls

    @classmethod
    def from_proto(cls, m: Message) -> CreatedApiKey:
        return cls(key=ApiKey.from_proto(m.key), api_key=m.api_key)


@dataclasses.dataclass(frozen=True)
class DeletedExpert(Result):
    blobs_removed: int
    bytes_freed: int


@dataclasses.dataclass(frozen=True)
class AuditEntry(Result):
    id: int
    at: datetime | None
    actor: str
    action: str
    target_type: str
    target_id: str
    details_json: str

    @classmethod
    def from_proto(cls, m: Message) -> AuditEntry:
        return _scalars(cls, m, at=_time(m.at))


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
        return _scalars(GenerateDelta, message)
    experts = tuple(_scalars(ExpertWeight, w) for w in message.experts)
    cls = GenerateStart if kind == "start" else GenerateEnd
    fields = {f: getattr(message, f) for f in cls.__dataclass_fields__ if f != "experts"}
    return cls(experts=experts, **fields)


def scalars(cls: type[T], message: Message) -> T:
    """A result whose fields are all scalars, copied from the message."""
    return _scalars(cls, message)  # type: ignore[no-any-return]


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
        return _scalars(cls, m, experts=_weights(m.experts), label_names=tuple(m.label_names))


ComposeEvent = ComposeProgress | Composition


def compose_event(response: Any) -> ComposeEvent:
    """One ``ComposeResponse`` of the stream as its event."""
    if response.WhichOneof("event") == "progress":
        return _scalars(ComposeProgress, response.progress)  # type: ignore[no-any-return]
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
    def from_proto(cls, m: Message) -> ServedExpert:
        return _scalars(cls, m, label_names=tuple(m.label_names), created_at=_time(m.created_at))


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
        return cls(
            experts=tuple(ServedExpert.from_proto(e) for e in m.experts),
            routers=tuple(_scalars(ServedRouter, r) for r in m.routers),
            active_router_version=m.active_router_version,
            active_router_method=m.active_router_method,
            compositions=tuple(Composition.from_proto(c) for c in m.compositions),
        )
