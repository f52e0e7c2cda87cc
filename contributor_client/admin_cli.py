"""``moerge admin ...``: one command per AdminService call, as tables or ``--json``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from moerge.contributor_client.connection import Target
from moerge.contributor_client.options import Coordinator, Json, TlsCa, Token
from moerge.contributor_client.output import emit_json, fields, table, to_dict
from moerge.contributor_client.rpc import call
from moerge.v1 import admin_pb2, common_pb2

app = typer.Typer(help="Administer the registry, routers and contributors.", no_args_is_help=True)
experts_app = typer.Typer(
    help="List, inspect, quarantine, retire and delete experts.", no_args_is_help=True
)
router_app = typer.Typer(
    help="Router versions: list, train now, activate (roll back).", no_args_is_help=True
)
tokens_app = typer.Typer(help="Enrollment tokens for new contributors.", no_args_is_help=True)
contributors_app = typer.Typer(help="List and revoke contributors.", no_args_is_help=True)
app.add_typer(experts_app, name="experts")
app.add_typer(router_app, name="router")
app.add_typer(tokens_app, name="tokens")
app.add_typer(contributors_app, name="contributors")


STATES = {
    "active": common_pb2.EXPERT_STATE_ACTIVE,
    "quarantined": common_pb2.EXPERT_STATE_QUARANTINED,
    "retired": common_pb2.EXPERT_STATE_RETIRED,
}


def _admin(
    method: str, request: object, coordinator: str | None, token: str | None, tls_ca: str | None
) -> object:
    return call(Target.resolve(coordinator, token, tls_ca), "admin", method, request)


def _state(value: str | None) -> int:
    if value is None:
        return common_pb2.EXPERT_STATE_UNSPECIFIED
    if value not in STATES:
        raise typer.BadParameter(f"state must be one of {', '.join(STATES)}")
    return STATES[value]


def _expert_rows(experts: list[common_pb2.Expert]) -> list[tuple[object, ...]]:
    names = {v: k for k, v in STATES.items()}
    return [
        (
            e.expert_id[:12],
            e.name,
            e.version,
            e.task_name,
            names.get(e.state, "?"),
            e.example_count,
            len(e.label_names),
            e.contributor_id[:12],
            _short(e.state_reason),
        )
        for e in experts
    ]


def _short(text: str, width: int = 48) -> str:
    """A table cell's first ``width`` characters (``show`` and ``--json`` give all of it)."""
    return text if len(text) <= width else text[: width - 1] + "…"


EXPERT_COLUMNS = (
    "id", "name", "v", "task", "state", "examples", "labels", "contributor", "reason",
)


@experts_app.command("list")
def experts_list(
    state: Annotated[str | None, typer.Option(help="active | quarantined | retired")] = None,
    contributor: Annotated[str | None, typer.Option(help="contributor id")] = None,
    task: Annotated[str | None, typer.Option(help="task name")] = None,
    page_size: int = 50,
    page_token: str = "",
    all_pages: Annotated[bool, typer.Option("--all", help="follow every page")] = False,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """List experts (paginated, filterable)."""
    experts: list[common_pb2.Expert] = []
    next_token = page_token
    while True:
        request = admin_pb2.ListExpertsRequest(
            page_size=page_size,
            page_token=next_token,
            state=_state(state),
            contributor_id=contributor or "",
            task_name=task or "",
        )
        response = _admin("ListExperts", request, coordinator, token, tls_ca)
        experts.extend(response.experts)
        next_token = response.next_page_token
        if not (all_pages and next_token):
            break
    if json_out:
        emit_json({"experts": [to_dict(e) for e in experts], "next_page_token": next_token})
        return
    table(f"experts ({len(experts)})", EXPERT_COLUMNS, _expert_rows(experts))
    if next_token:
        typer.echo(f"more: --page-token {next_token}")


@experts_app.command("show")
def experts_show(
    expert_id: str,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Every field of one expert."""
    expert = _admin(
        "GetExpert", admin_pb2.GetExpertRequest(expert_id=expert_id), coordinator, token, tls_ca
    )
    emit_json(expert) if json_out else fields(f"expert {expert_id}", expert)


@experts_app.command("set-state")
def experts_set_state(
    expert_id: str,
    state: Annotated[str, typer.Argument(help="active | quarantined | retired")],
    reason: Annotated[str, typer.Option(help="why (kept in the audit log)")] = "",
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Activate, quarantine or retire an expert."""
    request = admin_pb2.SetExpertStateRequest(
        expert_id=expert_id, state=_state(state), reason=reason
    )
    expert = _admin("SetExpertState", request, coordinator, token, tls_ca)
    emit_json(expert) if json_out else table("expert", EXPERT_COLUMNS, _expert_rows([expert]))


@experts_app.command("delete")
def experts_delete(
    expert_id: str,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Delete an expert and garbage-collect its blobs."""
    if not yes:
        typer.confirm(f"Delete expert {expert_id} and its files?", abort=True)
    response = _admin(
        "DeleteExpert",
        admin_pb2.DeleteExpertRequest(expert_id=expert_id),
        coordinator,
        token,
        tls_ca,
    )
    if json_out:
        emit_json(response)
    else:
        typer.echo(
            f"deleted; {response.blobs_removed} blobs removed, {response.bytes_freed} bytes freed"
        )


def _version_rows(versions: list[admin_pb2.RouterVersion]) -> list[tuple[object, ...]]:
    return [
        (
            v.version,
            "*" if v.active else "",
            v.method,
            v.status,
            len(v.expert_ids),
            v.trigger,
            f"{v.fit_seconds:.2f}",
            json.dumps(dict(v.metrics), sort_keys=True)[:60],
            v.error[:60],
        )
        for v in versions
    ]


VERSION_COLUMNS = (
    "version",
    "active",
    "method",
    "status",
    "experts",
    "trigger",
    "fit s",
    "metrics",
    "error",
)


@router_app.command("list")
def router_list(
    method: Annotated[str | None, typer.Option(help="only this method")] = None,
    page_size: int = 50,
    page_token: str = "",
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Router versions, newest first; the active one is starred."""
    request = admin_pb2.ListRouterVersionsRequest(
        page_size=page_size, page_token=page_token, method=method or ""
    )
    response = _admin("ListRouterVersions", request, coordinator, token, tls_ca)
    if json_out:
        emit_json(response)
        return
    table("router versions", VERSION_COLUMNS, _version_rows(list(response.versions)))


@router_app.command("train")
def router_train(
    method: Annotated[str | None, typer.Option(help="routing method (default: server's)")] = None,
    params: Annotated[str, typer.Option(help="method parameters as a JSON object")] = "",
    rounds: Annotated[int, typer.Option(help="federated rounds (method federated)")] = 0,
    no_activate: Annotated[
        bool, typer.Option("--no-activate", help="keep the current router")
    ] = False,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Fit a router now over the active experts."""
    request = admin_pb2.TrainRouterRequest(
        method=method or "", params_json=params, no_activate=no_activate, rounds=rounds
    )
    version = _admin("TrainRouter", request, coordinator, token, tls_ca)
    emit_json(version) if json_out else table(
        "new router version", VERSION_COLUMNS, _version_rows([version])
    )


@router_app.command("activate")
def router_activate(
    version: int,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Make an earlier router version active again (roll back)."""
    info = _admin(
        "ActivateRouterVersion",
        admin_pb2.ActivateRouterVersionRequest(version=version),
        coordinator,
        token,
        tls_ca,
    )
    emit_json(info) if json_out else table("active router", VERSION_COLUMNS, _version_rows([info]))


@tokens_app.command("create")
def tokens_create(
    note: Annotated[str, typer.Option(help="what the token is for")] = "",
    ttl: Annotated[int, typer.Option(help="seconds until it expires (0: never)")] = 0,
    max_uses: Annotated[int, typer.Option(help="how many contributors may join with it")] = 1,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Create an enrollment token (shown once)."""
    request = admin_pb2.CreateEnrollmentTokenRequest(note=note, ttl_seconds=ttl, max_uses=max_uses)
    response = _admin("CreateEnrollmentToken", request, coordinator, token, tls_ca)
    if json_out:
        emit_json(response)
    else:
        typer.echo(response.token)


@contributors_app.command("list")
def contributors_list(
    exclude_revoked: Annotated[bool, typer.Option("--exclude-revoked")] = False,
    page_size: int = 50,
    page_token: str = "",
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Contributors and whether they are revoked."""
    request = admin_pb2.ListContributorsRequest(
        page_size=page_size, page_token=page_token, exclude_revoked=exclude_revoked
    )
    response = _admin("ListContributors", request, coordinator, token, tls_ca)
    if json_out:
        emit_json(response)
        return
    rows = [
        (
            c.contributor_id,
            c.name,
            c.created_at.ToDatetime().isoformat(timespec="seconds"),
            "revoked" if c.revoked else "",
            c.revoke_reason,
        )
        for c in response.contributors
    ]
    table("contributors", ("id", "name", "joined", "status", "reason"), rows)


@contributors_app.command("revoke")
def contributors_revoke(
    contributor_id: str,
    reason: Annotated[str, typer.Option(help="why (kept in the audit log)")] = "",
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Revoke a contributor's credentials (its experts keep their state)."""
    request = admin_pb2.RevokeContributorRequest(contributor_id=contributor_id, reason=reason)
    info = _admin("RevokeContributor", request, coordinator, token, tls_ca)
    emit_json(info) if json_out else typer.echo(f"revoked {info.contributor_id} ({info.name})")


@app.command("audit")
def audit(
    action: Annotated[str | None, typer.Option(help="only this action")] = None,
    target: Annotated[str | None, typer.Option(help="only this target id")] = None,
    page_size: int = 100,
    page_token: str = "",
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """The audit log, newest first."""
    request = admin_pb2.ListAuditLogRequest(
        page_size=page_size, page_token=page_token, action=action or "", target_id=target or ""
    )
    response = _admin("ListAuditLog", request, coordinator, token, tls_ca)
    if json_out:
        emit_json(response)
        return
    rows = [
        (
            e.id,
            e.at.ToDatetime().isoformat(timespec="seconds"),
            e.actor,
            e.action,
            f"{e.target_type}:{e.target_id}",
            e.details_json[:80],
        )
        for e in response.entries
    ]
    table("audit log", ("id", "at", "actor", "action", "target", "details"), rows)
