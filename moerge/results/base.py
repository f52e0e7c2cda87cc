"""What every result shares: :class:`Result` (``to_dict``), :class:`Page`, the enum words, and
the helpers that copy a protobuf message's fields into a result."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from moerge.v1 import common_pb2, inference_pb2

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

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
#: The CLI's word for each expert state's enum value.
STATE_WORDS = {number: word for word, number in STATES.items()}

T = TypeVar("T")
D = TypeVar("D", bound="DataclassInstance")  # a result dataclass


class Result:
    """Base of every result: :meth:`to_dict` gives JSON-ready values."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (what ``--json`` prints)."""
        return _plain(self)


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


def utc_time(stamp: Timestamp) -> datetime | None:
    """A protobuf timestamp as a UTC ``datetime``; None when unset."""
    if not (stamp.seconds or stamp.nanos):
        return None
    return stamp.ToDatetime(tzinfo=timezone.utc)


def scalars(cls: type[D], message: Message, **given: Any) -> D:
    """``cls`` with every field not in ``given`` copied from the message's field of that name."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in given]
    return cls(**{name: getattr(message, name) for name in names}, **given)


@dataclasses.dataclass(frozen=True)
class Page(Result, Generic[T]):
    """One page of a list; pass ``next_page_token`` back for the next ("" on the last)."""

    items: tuple[T, ...]
    next_page_token: str
