"""``moerge admin tokens|contributors|keys``: who may call the coordinator.

Enrollment tokens let a new contributor join; contributors and users' API keys are listed and
revoked here. Secrets are shown once, when created, and never listed. The rest of ``moerge
admin`` (experts, routers, the audit log) is :mod:`.admin`, which attaches these groups.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from moerge.cli.options import Coordinator, Json, TlsCa, Token
from moerge.cli.output import emit_json, table
from moerge.cli.rpc import with_client

if TYPE_CHECKING:
    from moerge.results import ApiKey, EnrollmentTokenInfo

tokens_app = typer.Typer(help="Enrollment tokens for new contributors.", no_args_is_help=True)
contributors_app = typer.Typer(help="List and revoke contributors.", no_args_is_help=True)
keys_app = typer.Typer(
    help="API keys for users: inference only (predict, route, generate, the HTTP API).",
    no_args_is_help=True,
)


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
    created = with_client(
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
    page = with_client(
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
    info = with_client(
        coordinator, token, tls_ca, lambda api: api.revoke_enrollment_token(token_id)
    )
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
    created = with_client(
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
    page = with_client(
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
    info = with_client(coordinator, token, tls_ca, lambda api: api.revoke_api_key(key_id))
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
    page = with_client(
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
    info = with_client(
        coordinator,
        token,
        tls_ca,
        lambda api: api.revoke_contributor(contributor_id, reason),
    )
    emit_json(info) if json_out else typer.echo(f"revoked {info.contributor_id} ({info.name})")
