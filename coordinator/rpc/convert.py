"""Registry records <-> protobuf messages (the only place that knows both shapes)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Literal, overload

from google.protobuf.timestamp_pb2 import Timestamp

from moerge.refusals import InvalidArgument
from moerge.storage.records import (
    AuditEntryInfo,
    ContributorInfo,
    ExpertInfo,
    Principal,
    RouterVersionInfo,
    UploadInfo,
)
from moerge.v1 import admin_pb2, common_pb2, contributor_pb2

STATE_NAMES: dict[common_pb2.ExpertState.ValueType, str] = {
    common_pb2.EXPERT_STATE_ACTIVE: "active",
    common_pb2.EXPERT_STATE_QUARANTINED: "quarantined",
    common_pb2.EXPERT_STATE_RETIRED: "retired",
}
STATE_VALUES = {name: value for value, name in STATE_NAMES.items()}


def actor_of(principal: Principal) -> str:
    """How a caller is named in the audit log (ids only, never secrets)."""
    if principal.role == "contributor":
        return f"contributor:{principal.contributor_id}"
    return f"{principal.role}:{principal.credential_id}"


@overload
def state_name(
    value: common_pb2.ExpertState.ValueType, field: str, allow_unspecified: Literal[False]
) -> str: ...
@overload
def state_name(
    value: common_pb2.ExpertState.ValueType, field: str, allow_unspecified: bool
) -> str | None: ...
def state_name(
    value: common_pb2.ExpertState.ValueType, field: str, allow_unspecified: bool
) -> str | None:
    """Protobuf enum -> registry state; unknown or (where required) unset values are refused."""
    if value == common_pb2.EXPERT_STATE_UNSPECIFIED and allow_unspecified:
        return None
    if value not in STATE_NAMES:
        raise InvalidArgument(field, f"unknown or unset expert state {value}")
    return STATE_NAMES[value]


@overload
def timestamp(moment: datetime) -> Timestamp: ...
@overload
def timestamp(moment: datetime | None) -> Timestamp | None: ...
def timestamp(moment: datetime | None) -> Timestamp | None:
    """A protobuf Timestamp of ``moment``; None stays None (an unset message field)."""
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def expert(info: ExpertInfo) -> common_pb2.Expert:
    """An expert record as its protobuf message."""
    message = common_pb2.Expert(
        expert_id=info.id,
        name=info.name,
        version=info.version,
        contributor_id=info.contributor_id,
        task_name=info.task_name,
        task_description=info.task_description,
        task_type=info.task_type,
        state=STATE_VALUES.get(info.state, common_pb2.EXPERT_STATE_UNSPECIFIED),
        state_reason=info.state_reason or "",
        base_model_id=info.base_model_id,
        lora_rank=info.lora_rank,
        target_modules=list(info.target_modules),
        label_names=list(info.label_names),
        example_count=info.example_count,
        files=[
            common_pb2.ExpertFile(name=name, sha256=ref.sha256, size=ref.size)
            for name, ref in sorted(info.files.items())
        ],
        content_sha256=info.content_sha256,
    )
    dp = info.statistics.dp
    if dp:
        message.privacy.CopyFrom(
            common_pb2.PrivacyInfo(
                epsilon=float(dp.get("epsilon", 0.0)),
                delta=float(dp.get("delta", 0.0)),
                clip_norm=float(dp.get("clip_norm", 0.0)),
            )
        )
    message.privacy_report.CopyFrom(privacy_report(info))
    recorded = quality(info)
    if recorded is not None:
        message.quality.CopyFrom(recorded)
    if info.created_at:
        message.created_at.CopyFrom(timestamp(info.created_at))
    return message


def privacy_report(info: ExpertInfo) -> common_pb2.PrivacyReport:
    """The expert's privacy report as recorded at upload; for experts registered before
    privacy reports existed, derived from the statistics' DP record (adapter trained without DP)."""
    raw = (info.statistics.summary or {}).get("privacy")
    if not isinstance(raw, dict):
        dp = info.statistics.dp or {}
        epsilon, delta = float(dp.get("epsilon", 0.0)), float(dp.get("delta", 0.0))
        stats = common_pb2.PrivacyRelease(
            what="statistics",
            mechanism="gaussian" if dp else "none",
            epsilon=epsilon,
            delta=delta,
        )
        return common_pb2.PrivacyReport(
            releases=[stats, common_pb2.PrivacyRelease(what="adapter", mechanism="none")],
            epsilon=epsilon,
            delta=delta,
            all_dp=False,
            statistics_opt_out=not dp,
            unit="example",
        )
    return common_pb2.PrivacyReport(
        releases=[
            common_pb2.PrivacyRelease(
                what=str(r.get("what", "")),
                mechanism=str(r.get("mechanism", "")),
                epsilon=float(r.get("epsilon") or 0.0),
                delta=float(r.get("delta") or 0.0),
            )
            for r in raw.get("releases", [])
            if isinstance(r, dict)
        ],
        all_dp=bool(raw.get("all_dp")),
        epsilon=float(raw.get("epsilon") or 0.0),
        delta=float(raw.get("delta") or 0.0),
        statistics_opt_out=bool(raw.get("statistics_opt_out")),
        unit=str(raw.get("unit") or "example"),
    )


QUALITY_FIGURES = (
    "validation_accuracy",
    "probe_accuracy",
    "majority_accuracy",
    "validation_loss",
    "base_validation_loss",
)


def quality(info: ExpertInfo) -> common_pb2.ExpertQuality | None:
    """The expert's validation figures beside its baselines, as its statistics.json recorded
    them at upload (checked then by :meth:`~moerge.expert_format.ExpertQuality.validate`);
    None for an expert without them (trained before they were recorded, or adapter-only)."""
    raw = (info.statistics.summary or {}).get("quality")
    if not isinstance(raw, dict):
        return None
    message = common_pb2.ExpertQuality(validation_examples=int(raw.get("validation_examples") or 0))
    for name in QUALITY_FIGURES:
        if raw.get(name) is not None:  # unset: not measured
            setattr(message, name, float(raw[name]))
    return message


def router_version(info: RouterVersionInfo) -> admin_pb2.RouterVersion:
    """A router version as its protobuf message."""
    message = admin_pb2.RouterVersion(
        version=info.version,
        method=info.method,
        status=info.status,
        active=info.active,
        params_json=json.dumps(info.params, sort_keys=True),
        expert_ids=list(info.expert_ids),
        artifact_sha256=info.artifact_sha256 or "",
        artifact_size=info.artifact_size or 0,
        metrics={k: float(v) for k, v in (info.metrics or {}).items()},
        error=info.error or "",
        trigger=info.trigger or "",
        fit_seconds=info.fit_seconds or 0.0,
    )
    if info.created_at:
        message.created_at.CopyFrom(timestamp(info.created_at))
    return message


def contributor(info: ContributorInfo) -> admin_pb2.Contributor:
    """A contributor record as its protobuf message."""
    message = admin_pb2.Contributor(
        contributor_id=info.id,
        name=info.name,
        revoked=info.revoked_at is not None,
        revoke_reason=info.revoke_reason or "",
    )
    if info.created_at:
        message.created_at.CopyFrom(timestamp(info.created_at))
    return message


def audit_entry(info: AuditEntryInfo) -> admin_pb2.AuditEntry:
    """An audit entry as its protobuf message, details as sorted JSON."""
    message = admin_pb2.AuditEntry(
        id=info.id,
        actor=info.actor,
        action=info.action,
        target_type=info.target_type or "",
        target_id=info.target_id or "",
        details_json=json.dumps(info.details or {}, sort_keys=True, default=str),
    )
    message.at.CopyFrom(timestamp(info.at))
    return message


def upload_status(info: UploadInfo) -> contributor_pb2.UploadStatus:
    """An upload's record as its protobuf status."""
    return contributor_pb2.UploadStatus(
        upload_id=info.upload_id,
        state=info.state,
        received_bytes=info.received_bytes,
        total_bytes=info.total_bytes,
        error=info.error or "",
        expert_id=info.expert_id or "",
    )
