"""AdminService logic: the registry, router versions, enrollment and the audit log.

Plain functions over :class:`~moerge.coordinator.state.CoordinatorState`; no grpc imports.
"""

from __future__ import annotations

import json

from moerge.coordinator import convert
from moerge.coordinator.state import CoordinatorState
from moerge.storage.errors import InvalidArgument
from moerge.storage.records import ContributorInfo, Principal
from moerge.storage.validation import MAX_INT32, check_int, check_text
from moerge.v1 import admin_pb2, common_pb2

MAX_REASON = 1000
MAX_TTL_SECONDS = 365 * 24 * 3600
MAX_TOKEN_USES = 10_000


def list_experts(
    request: admin_pb2.ListExpertsRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.ListExpertsResponse:
    page = state.registry.list_experts(
        page_size=request.page_size or 50,
        page_token=request.page_token or None,
        state=convert.state_name(request.state, "state", allow_unspecified=True),
        contributor_id=request.contributor_id or None,
        task_name=request.task_name or None,
    )
    return admin_pb2.ListExpertsResponse(
        experts=[convert.expert(e) for e in page.items], next_page_token=page.next_page_token or ""
    )


def get_expert(
    request: admin_pb2.GetExpertRequest, state: CoordinatorState, principal: Principal
) -> common_pb2.Expert:
    return convert.expert(state.registry.get_expert(request.expert_id))


def set_expert_state(
    request: admin_pb2.SetExpertStateRequest, state: CoordinatorState, principal: Principal
) -> common_pb2.Expert:
    new_state = convert.state_name(request.state, "state", allow_unspecified=False)
    check_text("reason", request.reason, MAX_REASON)
    info = state.registry.set_expert_state(
        convert.actor_of(principal), request.expert_id, new_state, request.reason
    )
    return convert.expert(info)


def delete_expert(
    request: admin_pb2.DeleteExpertRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.DeleteExpertResponse:
    result = state.registry.delete_expert(convert.actor_of(principal), request.expert_id)
    state.experts.forget(request.expert_id)
    return admin_pb2.DeleteExpertResponse(
        blobs_removed=result.removed, bytes_freed=result.bytes_freed
    )


def list_router_versions(
    request: admin_pb2.ListRouterVersionsRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.ListRouterVersionsResponse:
    page = state.registry.list_router_versions(
        page_size=request.page_size or 50,
        page_token=request.page_token or None,
        method=request.method or None,
    )
    return admin_pb2.ListRouterVersionsResponse(
        versions=[convert.router_version(v) for v in page.items],
        next_page_token=page.next_page_token or "",
    )


def train_router(
    request: admin_pb2.TrainRouterRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.RouterVersion:
    params = parse_params(request.params_json)
    if request.rounds:
        if request.rounds < 0:
            raise InvalidArgument("rounds", "must be >= 0")
        params["rounds"] = request.rounds
    info = state.routers.train(
        request.method or None,
        params,
        convert.actor_of(principal),
        "manual",
        activate=not request.no_activate,
    )
    return convert.router_version(info)


def activate_router_version(
    request: admin_pb2.ActivateRouterVersionRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.RouterVersion:
    check_int("version", request.version, minimum=1, maximum=MAX_INT32)
    return convert.router_version(
        state.routers.activate(convert.actor_of(principal), request.version)
    )


def create_enrollment_token(
    request: admin_pb2.CreateEnrollmentTokenRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.CreateEnrollmentTokenResponse:
    check_text("note", request.note, MAX_REASON)
    if not 0 <= request.ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidArgument("ttl_seconds", f"must be in 0..{MAX_TTL_SECONDS}")
    if not 0 <= request.max_uses <= MAX_TOKEN_USES:
        raise InvalidArgument("max_uses", f"must be in 0..{MAX_TOKEN_USES}")
    info, token = state.registry.create_enrollment_token(
        convert.actor_of(principal),
        note=request.note,
        ttl_seconds=request.ttl_seconds or None,
        max_uses=request.max_uses or 1,
    )
    response = admin_pb2.CreateEnrollmentTokenResponse(
        token_id=info.id, token=token, max_uses=info.max_uses
    )
    if info.expires_at:
        response.expires_at.CopyFrom(convert.timestamp(info.expires_at))
    return response


def list_contributors(
    request: admin_pb2.ListContributorsRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.ListContributorsResponse:
    page = state.registry.list_contributors(
        page_size=request.page_size or 50,
        page_token=request.page_token or None,
        include_revoked=not request.exclude_revoked,
    )
    counts = state.registry.expert_counts([c.id for c in page.items])
    return admin_pb2.ListContributorsResponse(
        contributors=[_contributor(c, counts[c.id]) for c in page.items],
        next_page_token=page.next_page_token or "",
    )


def _contributor(info: ContributorInfo, expert_count: int) -> admin_pb2.Contributor:
    message = convert.contributor(info)
    message.expert_count = min(expert_count, MAX_INT32)
    return message


def revoke_contributor(
    request: admin_pb2.RevokeContributorRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.Contributor:
    check_text("reason", request.reason, MAX_REASON)
    info = state.registry.revoke_contributor(
        convert.actor_of(principal), request.contributor_id, request.reason
    )
    return _contributor(info, state.registry.expert_counts([info.id])[info.id])


def list_audit_log(
    request: admin_pb2.ListAuditLogRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.ListAuditLogResponse:
    page = state.registry.list_audit(
        page_size=request.page_size or 100,
        page_token=request.page_token or None,
        action=request.action or None,
        target_id=request.target_id or None,
    )
    return admin_pb2.ListAuditLogResponse(
        entries=[convert.audit_entry(e) for e in page.items],
        next_page_token=page.next_page_token or "",
    )


def parse_params(raw: str) -> dict[str, object]:
    """``params_json`` must be empty or a JSON object."""
    if not raw:
        return {}
    try:
        params = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidArgument("params_json", f"not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise InvalidArgument("params_json", "not valid JSON: nested too deeply") from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise InvalidArgument("params_json", "not valid JSON: a number is too long") from None
    if not isinstance(params, dict):
        raise InvalidArgument("params_json", "must be a JSON object")
    return params
