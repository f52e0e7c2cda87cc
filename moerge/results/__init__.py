"""Typed results of :class:`moerge.Client` calls: frozen dataclasses built from the gRPC messages.

Why not hand back the protobuf messages: their int64 fields turn into strings and their enums
into ``EXPERT_STATE_QUARANTINED`` in JSON, timestamps need ``ToDatetime()``, and an unset
sub-message reads as a default instance. Here numbers are numbers, enum values are the words
the CLI takes (``"quarantined"``, ``"ensemble"``), times are UTC ``datetime`` (``None`` when
unset), and :meth:`Result.to_dict` is what ``--json`` prints.

One module per kind of call: :mod:`.experts` (experts, their privacy, the contributor's calls),
:mod:`.inference` (predictions, routing, streamed generation and composition, ``ListModels``),
:mod:`.admin` (the AdminService's answers), over :mod:`.base` (:class:`Result`, :class:`Page`,
the enum words). Every result is importable from ``moerge.results``.
"""

from moerge.results.admin import (
    ApiKey,
    AuditEntry,
    Contributor,
    CreatedApiKey,
    DeletedExpert,
    EnrollmentToken,
    EnrollmentTokenInfo,
    RouterVersion,
)
from moerge.results.base import AGGREGATIONS, STATE_WORDS, STATES, Page, Result, scalars, utc_time
from moerge.results.experts import (
    BaseModel,
    Expert,
    ExpertFile,
    Joined,
    NodeKeyRegistration,
    Privacy,
    PrivacyRelease,
    PrivacyReport,
    Quality,
    Upload,
)
from moerge.results.inference import (
    ComposeEvent,
    ComposeProgress,
    Composition,
    ExpertOutput,
    ExpertWeight,
    GenerateDelta,
    GenerateEnd,
    GenerateEvent,
    GenerateStart,
    LabelScore,
    Models,
    Prediction,
    Predictions,
    Routing,
    ServedExpert,
    ServedRouter,
    compose_event,
    generate_event,
    weights_of,
)

__all__ = [
    "AGGREGATIONS",
    "STATES",
    "STATE_WORDS",
    "ApiKey",
    "AuditEntry",
    "BaseModel",
    "ComposeEvent",
    "ComposeProgress",
    "Composition",
    "Contributor",
    "CreatedApiKey",
    "DeletedExpert",
    "EnrollmentToken",
    "EnrollmentTokenInfo",
    "Expert",
    "ExpertFile",
    "ExpertOutput",
    "ExpertWeight",
    "GenerateDelta",
    "GenerateEnd",
    "GenerateEvent",
    "GenerateStart",
    "Joined",
    "LabelScore",
    "Models",
    "NodeKeyRegistration",
    "Page",
    "Prediction",
    "Predictions",
    "Privacy",
    "PrivacyRelease",
    "PrivacyReport",
    "Quality",
    "Result",
    "RouterVersion",
    "Routing",
    "ServedExpert",
    "ServedRouter",
    "Upload",
    "compose_event",
    "generate_event",
    "scalars",
    "utc_time",
    "weights_of",
]
