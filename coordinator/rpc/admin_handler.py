"""AdminService logic: the registry, router versions, enrollment and the audit log.

Plain functions over :class:`~moerge.coordinator.state.CoordinatorState`; no grpc imports.
"""

from __future__ import annotations

import json

from moerge.coordinator.rpc import convert
from moerge.coordinator.services.node_keys import admit_node_keys
from moerge.coordinator.state import CoordinatorState
from moerge.refusals import InvalidArgument
from moerge.storage.records import ApiKeyInfo, ContributorInfo, EnrollmentTokenInfo, Principal
from moerge.storage.validation import MAX_INT32, check_int, check_text
from moerge.v1 import admin_pb2, common_pb2

MAX_REASON = 1000
MAX_TTL_SECONDS = 365 * 24 * 3600
MAX_TOKEN_USES = 10_000
MAX_RATE_LIMIT = 1_000_000  # requests per minute


def list_experts(
    request: admin_pb2.ListExpertsRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.ListExpertsResponse:
    """A page of experts (50 by default), filtered by state when one is given."""
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
    """One expert by id."""
    return convert.expert(state.registry.get_expert(request.expert_id))


def set_expert_state(
    request: admin_pb2.SetExpertStateRequest, state: CoordinatorState, principal: Principal
) -> common_pb2.Expert:
    """Move an expert to a new state (unset is refused), audited with the reason."""
    new_state = convert.state_name(request.state, "state", allow_unspecified=False)
    check_text("reason", request.reason, MAX_REASON)
    info = state.registry.set_expert_state(
        convert.actor_of(principal), request.expert_id, new_state, request.reason
    )
    return convert.expert(info)


def delete_expert(
    request: admin_pb2.DeleteExpertRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.DeleteExpertResponse:
    """Delete an expert's rows, its unshared blobs and its local unpacked copy; how many blobs and
    bytes went."""
    result = state.registry.delete_expert(convert.actor_of(principal), request.expert_id)
    state.experts.forget(request.expert_id)
    return admin_pb2.DeleteExpertResponse(
        blobs_removed=result.removed, bytes_freed=result.bytes_freed
    )


def list_router_versions(
    request: admin_pb2.ListRouterVersionsRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.ListRouterVersionsResponse:
    """A page of router versions (50 by default), optionally of one method."""
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
    """Fit a router version now: the given method and JSON params (the active version's when empty),
    ``rounds`` for federated methods; activated unless ``no_activate``."""
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
    """Make a trained version the active router again."""
    check_int("version", request.version, minimum=1, maximum=MAX_INT32)
    return convert.router_version(
        state.routers.activate(convert.actor_of(principal), request.version)
    )


def create_enrollment_token(
    request: admin_pb2.CreateEnrollmentTokenRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.CreateEnrollmentTokenResponse:
    """A new enrollment token (its secret shown only here), with a lifetime and a number of uses
    within the registry's bounds."""
    check_text("note", request.note, MAX_REASON)
    if not 0 <= request.ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidArgument("ttl_seconds", f"must be in 0..{MAX_TTL_SECONDS}")
    if not 0 <= request.max_uses <= MAX_TOKEN_USES:
        raise InvalidArgument("max_uses", f"must be in 0..{MAX_TOKEN_USES}")
    default_ttl = state.config.enrollment_token_ttl_days * 86400  # 0: never expires
    info, token = state.registry.create_enrollment_token(
        convert.actor_of(principal),
        note=request.note,
        ttl_seconds=request.ttl_seconds or default_ttl or None,
        max_uses=request.max_uses or 1,
    )
    response = admin_pb2.CreateEnrollmentTokenResponse(
        token_id=info.id, token=token, max_uses=info.max_uses
    )
    if info.expires_at:
        response.expires_at.CopyFrom(convert.timestamp(info.expires_at))
    return response


def _enrollment_token(info: EnrollmentTokenInfo) -> admin_pb2.EnrollmentToken:
    return admin_pb2.EnrollmentToken(
        token_id=info.id,
        note=info.note,
        created_by=info.created_by,
        created_at=convert.timestamp(info.created_at),
        expires_at=convert.timestamp(info.expires_at),
        max_uses=info.max_uses,
        uses=info.uses,
        revoked=info.revoked_at is not None,
    )


def list_enrollment_tokens(
    request: admin_pb2.ListEnrollmentTokensRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.ListEnrollmentTokensResponse:
    """A page of enrollment tokens, revoked ones included unless excluded."""
    page = state.registry.list_enrollment_tokens(
        page_size=request.page_size or 50,
        page_token=request.page_token or None,
        include_revoked=not request.exclude_revoked,
    )
    return admin_pb2.ListEnrollmentTokensResponse(
        tokens=[_enrollment_token(t) for t in page.items],
        next_page_token=page.next_page_token or "",
    )


def revoke_enrollment_token(
    request: admin_pb2.RevokeEnrollmentTokenRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.EnrollmentToken:
    """Revoke an enrollment token, audited."""
    info = state.registry.revoke_enrollment_token(convert.actor_of(principal), request.token_id)
    return _enrollment_token(info)


def _api_key(info: ApiKeyInfo) -> admin_pb2.ApiKey:
    return admin_pb2.ApiKey(
        key_id=info.id,
        note=info.note,
        created_by=info.created_by,
        created_at=convert.timestamp(info.created_at),
        expires_at=convert.timestamp(info.expires_at),
        rate_limit_per_minute=info.rate_limit_per_minute or 0,
        revoked=info.revoked_at is not None,
        last_used_at=convert.timestamp(info.last_used_at),
    )


def create_api_key(
    request: admin_pb2.CreateApiKeyRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.CreateApiKeyResponse:
    """A new user API key (its secret shown only here), with an optional lifetime and per-minute
    limit within the registry's bounds."""
    check_text("note", request.note, MAX_REASON)
    if not 0 <= request.ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidArgument("ttl_seconds", f"must be in 0..{MAX_TTL_SECONDS}")
    if not 0 <= request.rate_limit_per_minute <= MAX_RATE_LIMIT:
        raise InvalidArgument("rate_limit_per_minute", f"must be in 0..{MAX_RATE_LIMIT}")
    info, key = state.registry.create_api_key(
        convert.actor_of(principal),
        note=request.note,
        ttl_seconds=request.ttl_seconds or None,
        rate_limit_per_minute=request.rate_limit_per_minute or None,
    )
    return admin_pb2.CreateApiKeyResponse(key=_api_key(info), api_key=key)


def list_api_keys(
    request: admin_pb2.ListApiKeysRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.ListApiKeysResponse:
    """A page of API keys, revoked ones included unless excluded."""
    page = state.registry.list_api_keys(
        page_size=request.page_size or 50,
        page_token=request.page_token or None,
        include_revoked=not request.exclude_revoked,
    )
    return admin_pb2.ListApiKeysResponse(
        keys=[_api_key(k) for k in page.items], next_page_token=page.next_page_token or ""
    )


def revoke_api_key(
    request: admin_pb2.RevokeApiKeyRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.ApiKey:
    """Revoke an API key, audited."""
    return _api_key(state.registry.revoke_api_key(convert.actor_of(principal), request.key_id))


def list_contributors(
    request: admin_pb2.ListContributorsRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.ListContributorsResponse:
    """A page of contributors, each with how many experts it registered."""
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
    """Revoke a contributor and its credentials, audited with the reason; its SuperNode keys leave
    the SuperLink."""
    check_text("reason", request.reason, MAX_REASON)
    info = state.registry.revoke_contributor(
        convert.actor_of(principal), request.contributor_id, request.reason
    )
    admit_node_keys(state)  # its SuperNodes are unregistered: they leave the rounds
    return _contributor(info, state.registry.expert_counts([info.id])[info.id])


def list_audit_log(
    request: admin_pb2.ListAuditLogRequest, state: CoordinatorState, principal: Principal
) -> admin_pb2.ListAuditLogResponse:
    """A page of the audit log (100 by default), optionally of one action."""
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
