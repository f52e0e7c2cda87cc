"""``moerge admin ...``: one command per AdminService call, as tables or ``--json``.

A thin layer over :class:`moerge.Client`'s admin calls. Wherever a command takes an expert,
contributor, API key or enrollment token id, a unique prefix of it will do (as git takes commit
ids): the client resolves it with a list call, and a prefix that matches several ids is refused,
naming them. ``audit --target`` is the exception: it filters entries about any kind of target
(router version numbers, uploads, ...), so it takes the exact id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from moerge.cli.options import Coordinator, Json, TlsCa, Token
from moerge.cli.output import emit_json, fields, table
from moerge.cli.rpc import client, guarded

if TYPE_CHECKING:
    from moerge.client import Client
    from moerge.results import ApiKey, EnrollmentTokenInfo, Expert, RouterVersion

app = typer.Typer(help="Administer the registry, routers and contributors.", no_args_is_help=True)
experts_app = typer.Typer(
    help="List, inspect, quarantine, retire and delete experts.", no_args_is_help=True
)
router_app = typer.Typer(
    help="Router versions: list, train now, activate (roll back).", no_args_is_help=True
)
tokens_app = typer.Typer(help="Enrollment tokens for new contributors.", no_args_is_help=True)
contributors_app = typer.Typer(help="List and revoke contributors.", no_args_is_help=True)
keys_app = typer.Typer(
    help="API keys for users: inference only (predict, route, generate, the HTTP API).",
    no_args_is_help=True,
)
app.add_typer(experts_app, name="experts")
app.add_typer(router_app, name="router")
app.add_typer(tokens_app, name="tokens")
app.add_typer(contributors_app, name="contributors")
app.add_typer(keys_app, name="keys")

STATE_WORDS = "active | quarantined | retired"
#: The coordinator's routing methods, for ``router train --help`` without importing torch
#: (tests/client checks this against router_training.methods.available_methods()).
ROUTER_METHODS = (
    "arrow", "base", "centroid", "federated", "lda", "mlp", "oracle", "phatgoose", "qda",
    "uniform",
)  # fmt: skip
ExpertId = Annotated[str, typer.Argument(help="expert id or a unique prefix of it")]


def _run(coordinator: str | None, token: str | None, tls_ca: str | None, work: Any) -> Any:
    """``work(client)`` with the command's client; errors print and exit 1."""
    with client(coordinator, token, tls_ca) as api:
        return guarded(lambda: work(api))


def _expert_rows(experts: list[Expert]) -> list[tuple[object, ...]]:
    return [
        (
            e.expert_id[:12],
            e.name,
            e.version,
            e.task_name,
            e.state,
            e.example_count,
            len(e.label_names),
            e.privacy_report.summary() if e.privacy_report else "",
            e.contributor_id[:12],
            _short(e.state_reason),
        )
        for e in experts
    ]


def _short(text: str, width: int = 48) -> str:
    """A table cell's first ``width`` characters (``show`` and ``--json`` give all of it)."""
    return text if len(text) <= width else text[: width - 1] + "…"


EXPERT_COLUMNS = (
    "id", "name", "v", "task", "state", "examples", "labels", "privacy", "contributor", "reason",
)  # fmt: skip


@experts_app.command("list")
def experts_list(
    state: Annotated[str | None, typer.Option(help=STATE_WORDS)] = None,
    contributor: Annotated[str | None, typer.Option(help="contributor id (or prefix)")] = None,
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

    def pages(api: Client) -> tuple[list[Expert], str]:
        experts: list[Expert] = []
        next_token = page_token
        while True:
            page = api.list_experts(
                state=state,
                contributor=contributor or "",
                task=task or "",
                page_size=page_size,
                page_token=next_token,
            )
            experts += page.items
            next_token = page.next_page_token
            if not (all_pages and next_token):
                return experts, next_token

    experts, next_token = _run(coordinator, token, tls_ca, pages)
    if json_out:
        emit_json({"experts": experts, "next_page_token": next_token})
        return
    table(f"experts ({len(experts)})", EXPERT_COLUMNS, _expert_rows(experts))
    if next_token:
        typer.echo(f"more: --page-token {next_token}")


@experts_app.command("show")
def experts_show(
    expert_id: ExpertId,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Every field of one expert."""
    expert = _run(coordinator, token, tls_ca, lambda api: api.get_expert(expert_id))
    if json_out:
        emit_json(expert)
        return
    fields(f"expert {expert.expert_id}", expert)
    if expert.privacy_report is not None:
        from moerge.cli.training import privacy_table

        privacy_table(expert.privacy_report)


@experts_app.command("set-state")
def experts_set_state(
    expert_id: ExpertId,
    state: Annotated[str, typer.Argument(help=STATE_WORDS)],
    reason: Annotated[str, typer.Option(help="why (kept in the audit log)")] = "",
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Activate, quarantine or retire an expert."""
    expert = _run(
        coordinator,
        token,
        tls_ca,
        lambda api: api.set_expert_state(expert_id, state, reason),
    )
    emit_json(expert) if json_out else table("expert", EXPERT_COLUMNS, _expert_rows([expert]))


@experts_app.command("delete")
def experts_delete(
    expert_id: ExpertId,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Delete an expert and garbage-collect its blobs."""
    with client(coordinator, token, tls_ca) as api:
        full_id = guarded(lambda: api.resolve_expert_id(expert_id))
        if not yes:
            typer.confirm(f"Delete expert {full_id} and its files?", abort=True)
        deleted = guarded(lambda: api.delete_expert(full_id))
    if json_out:
        emit_json(deleted)
    else:
        typer.echo(
            f"deleted {full_id}; {deleted.blobs_removed} blobs removed, "
            f"{deleted.bytes_freed} bytes freed"
        )


def _version_rows(versions: list[RouterVersion]) -> list[tuple[object, ...]]:
    import json

    return [
        (
            v.version,
            "*" if v.active else "",
            v.method,
            v.status,
            len(v.expert_ids),
            v.trigger,
            f"{v.fit_seconds:.2f}",
            _short(json.dumps(v.metrics, sort_keys=True), 60),
            _short(v.error, 60),
        )
        for v in versions
    ]


VERSION_COLUMNS = (
    "version", "active", "method", "status", "experts", "trigger", "fit s", "metrics", "error",
)  # fmt: skip


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
    page = _run(
        coordinator,
        token,
        tls_ca,
        lambda api: api.list_router_versions(
            method=method or "", page_size=page_size, page_token=page_token
        ),
    )
    if json_out:
        emit_json({"versions": page.items, "next_page_token": page.next_page_token})
        return
    table("router versions", VERSION_COLUMNS, _version_rows(list(page.items)))


@router_app.command("train")
def router_train(
    method: Annotated[
        str | None,
        typer.Option(help=f"routing method: {', '.join(ROUTER_METHODS)} (default: server's)"),
    ] = None,
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
    import json

    try:
        parsed = json.loads(params) if params else None
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--params is not JSON: {exc}") from None
    version = _run(
        coordinator,
        token,
        tls_ca,
        lambda api: api.train_router(
            method or "", params=parsed, rounds=rounds, activate=not no_activate
        ),
    )
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
    info = _run(coordinator, token, tls_ca, lambda api: api.activate_router_version(version))
    emit_json(info) if json_out else table("active router", VERSION_COLUMNS, _version_rows([info]))


@tokens_app.command("create")
def tokens_create(
    note: Annotated[str, typer.Option(help="what the token is for")] = "",
    ttl: Annotated[
        int,
        typer.Option(help="seconds until it expires (0: the coordinator's default, 7 days)"),
    ] = 0,
    max_uses: Annotated[int, typer.Option(help="how many contributors may join with it")] = 1,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Create an enrollment token (shown once)."""
    created = _run(
        coordinator,
        token,
        tls_ca,
        lambda api: api.create_enrollment_token(note=note, ttl_seconds=ttl, max_uses=max_uses),
    )
    emit_json(created) if json_out else typer.echo(created.token)


def _when(moment: object) -> str:
    return moment.isoformat(timespec="seconds") if moment else ""  # type: ignore[attr-defined]


def _token_rows(tokens: list[EnrollmentTokenInfo]) -> list[tuple[object, ...]]:
    return [
        (t.token_id, t.note, _when(t.created_at), _when(t.expires_at) or "never",
         f"{t.uses}/{t.max_uses}", "revoked" if t.revoked else "")
        for t in tokens
    ]  # fmt: skip


@tokens_app.command("list")
def tokens_list(
    exclude_revoked: Annotated[bool, typer.Option("--exclude-revoked")] = False,
    page_size: int = 50,
    page_token: str = "",
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Enrollment tokens: note, expiry, uses and whether revoked (never their secrets)."""
    page = _run(
        coordinator,
        token,
        tls_ca,
        lambda api: api.list_enrollment_tokens(
            exclude_revoked=exclude_revoked, page_size=page_size, page_token=page_token
        ),
    )
    if json_out:
        emit_json({"tokens": page.items, "next_page_token": page.next_page_token})
        return
    columns = ("id", "note", "created", "expires", "uses", "status")
    table("enrollment tokens", columns, _token_rows(list(page.items)))


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[
        str, typer.Argument(help="the token id (as `tokens list` shows it) or a unique prefix")
    ],
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Revoke an enrollment token: nobody else can join with it."""
    info = _run(coordinator, token, tls_ca, lambda api: api.revoke_enrollment_token(token_id))
    emit_json(info) if json_out else typer.echo(f"revoked enrollment token {info.token_id}")


def _key_rows(keys: list[ApiKey]) -> list[tuple[object, ...]]:
    return [
        (k.key_id, k.note, _when(k.created_at), _when(k.expires_at) or "never",
         k.rate_limit_per_minute or "default", _when(k.last_used_at),
         "revoked" if k.revoked else "")
        for k in keys
    ]  # fmt: skip


KEY_COLUMNS = ("id", "note", "created", "expires", "per minute", "last used", "status")


@keys_app.command("create")
def keys_create(
    note: Annotated[str, typer.Option(help="who or what the key is for")] = "",
    expires_in: Annotated[
        float, typer.Option("--expires-in", help="days until it expires (0: never)")
    ] = 0,
    rate_limit: Annotated[
        int,
        typer.Option(
            "--rate-limit",
            help="inference requests per minute (0: the coordinator's default)",
        ),
    ] = 0,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Create a user's API key (shown once): it may call predict, route and generate only."""
    if expires_in < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--expires-in")
    created = _run(
        coordinator,
        token,
        tls_ca,
        lambda api: api.create_api_key(
            note=note, ttl_seconds=round(expires_in * 86400), rate_limit_per_minute=rate_limit
        ),
    )
    emit_json(created) if json_out else typer.echo(created.api_key)


@keys_app.command("list")
def keys_list(
    exclude_revoked: Annotated[bool, typer.Option("--exclude-revoked")] = False,
    page_size: int = 50,
    page_token: str = "",
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """API keys: note, expiry, rate limit, last use and whether revoked (never their secrets)."""
    page = _run(
        coordinator,
        token,
        tls_ca,
        lambda api: api.list_api_keys(
            exclude_revoked=exclude_revoked, page_size=page_size, page_token=page_token
        ),
    )
    if json_out:
        emit_json({"keys": page.items, "next_page_token": page.next_page_token})
        return
    table("API keys", KEY_COLUMNS, _key_rows(list(page.items)))


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[
        str, typer.Argument(help="the key id (as `keys list` shows it) or a unique prefix")
    ],
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Revoke an API key: its very next request is refused."""
    info = _run(coordinator, token, tls_ca, lambda api: api.revoke_api_key(key_id))
    emit_json(info) if json_out else typer.echo(f"revoked API key {info.key_id}")


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
    page = _run(
        coordinator,
        token,
        tls_ca,
        lambda api: api.list_contributors(
            exclude_revoked=exclude_revoked, page_size=page_size, page_token=page_token
        ),
    )
    if json_out:
        emit_json({"contributors": page.items, "next_page_token": page.next_page_token})
        return
    rows = [
        (
            c.contributor_id,
            c.name,
            c.created_at.isoformat(timespec="seconds") if c.created_at else "",
            "revoked" if c.revoked else "",
            c.revoke_reason,
        )
        for c in page.items
    ]
    table("contributors", ("id", "name", "joined", "status", "reason"), rows)


@contributors_app.command("revoke")
def contributors_revoke(
    contributor_id: Annotated[str, typer.Argument(help="contributor id or a unique prefix")],
    reason: Annotated[str, typer.Option(help="why (kept in the audit log)")] = "",
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """Revoke a contributor's credentials (its experts keep their state)."""
    info = _run(
        coordinator,
        token,
        tls_ca,
        lambda api: api.revoke_contributor(contributor_id, reason),
    )
    emit_json(info) if json_out else typer.echo(f"revoked {info.contributor_id} ({info.name})")


@app.command("audit")
def audit(
    action: Annotated[str | None, typer.Option(help="only this action")] = None,
    target: Annotated[
        str | None, typer.Option(help="only this target id (exact: targets are of many kinds)")
    ] = None,
    page_size: int = 100,
    page_token: str = "",
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """The audit log, newest first."""
    page = _run(
        coordinator,
        token,
        tls_ca,
        lambda api: api.audit_log(
            action=action or "", target=target or "", page_size=page_size, page_token=page_token
        ),
    )
    if json_out:
        emit_json({"entries": page.items, "next_page_token": page.next_page_token})
        return
    rows = [
        (
            e.id,
            e.at.isoformat(timespec="seconds") if e.at else "",
            e.actor,
            e.action,
            f"{e.target_type}:{e.target_id}",
            _short(e.details_json, 80),
        )
        for e in page.items
    ]
    table("audit log", ("id", "at", "actor", "action", "target", "details"), rows)
