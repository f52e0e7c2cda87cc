"""``moerge admin ...``: one command per AdminService call, as tables or ``--json``.

This module holds the registry's commands (``experts``, ``router``, ``audit``);
:mod:`.admin_access` those about who may call (``tokens``, ``contributors``, ``keys``).

A thin layer over :class:`moerge.Client`'s admin calls. Wherever a command takes an expert,
contributor, API key or enrollment token id, a unique prefix of it will do (as git takes commit
ids): the client resolves it with a list call, and a prefix that matches several ids is refused,
naming them. ``audit --target`` is the exception: it filters entries about any kind of target
(router version numbers, uploads, ...), so it takes the exact id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from moerge.cli import admin_access
from moerge.cli.expert_report import privacy_table, quality_table
from moerge.cli.options import Coordinator, Json, TlsCa, Token
from moerge.cli.output import emit_json, fields, table
from moerge.cli.rpc import client, guarded, with_client

if TYPE_CHECKING:
    from moerge.client import Client
    from moerge.results import Expert, RouterVersion

app = typer.Typer(help="Administer the registry, routers and contributors.", no_args_is_help=True)
experts_app = typer.Typer(
    help="List, inspect, quarantine, retire and delete experts.", no_args_is_help=True
)
router_app = typer.Typer(
    help="Router versions: list, train now, activate (roll back).", no_args_is_help=True
)
app.add_typer(experts_app, name="experts")
app.add_typer(router_app, name="router")
app.add_typer(admin_access.tokens_app, name="tokens")
app.add_typer(admin_access.contributors_app, name="contributors")
app.add_typer(admin_access.keys_app, name="keys")

STATE_WORDS = "active | quarantined | retired"
#: The coordinator's routing methods, for ``router train --help`` without importing torch
#: (tests/client checks this against router_training.methods.available_methods()).
ROUTER_METHODS = (
    "arrow", "base", "centroid", "federated", "lda", "mlp", "oracle", "phatgoose", "qda",
    "uniform",
)  # fmt: skip
ExpertId = Annotated[str, typer.Argument(help="expert id or a unique prefix of it")]


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

    experts, next_token = with_client(coordinator, token, tls_ca, pages)
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
    """Every field of one expert, its recorded quality and its privacy report."""
    expert = with_client(coordinator, token, tls_ca, lambda api: api.get_expert(expert_id))
    if json_out:
        emit_json(expert)
        return
    fields(f"expert {expert.expert_id}", expert)
    if expert.quality is not None:
        quality_table(expert.quality)
    if expert.privacy_report is not None:
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
    expert = with_client(
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
    page = with_client(
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
    version = with_client(
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
    info = with_client(coordinator, token, tls_ca, lambda api: api.activate_router_version(version))
    emit_json(info) if json_out else table("active router", VERSION_COLUMNS, _version_rows([info]))


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
    page = with_client(
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
