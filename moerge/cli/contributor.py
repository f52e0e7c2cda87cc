"""Contributor commands: ``join``, ``upload``, ``my-experts`` and ``contributor serve|node-key``.

A thin layer over :class:`moerge.Client` and :mod:`moerge.contributor_client`: each command
parses its options, makes one or two calls and prints the result as a table or, with
``--json``, as JSON. The training commands (``train``, ``stats``, ``contribute``) are in
:mod:`~moerge.cli.training`; ``contributor serve`` runs the SuperNode that
:mod:`moerge.contributor_client.supernode` describes.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated

import typer

from moerge.cli.options import (
    Coordinator,
    Json,
    TlsCa,
    Token,
    Transport,
    TransportChoice,
)
from moerge.cli.output import emit_json, table
from moerge.cli.rpc import client, guarded
from moerge.cli.training import agreed_base_model
from moerge.contributor_client.connection import ClientConfig, Target
from moerge.contributor_client.supernode import embed_data, node_key_pair, supernode_command


def join(
    coordinator: Annotated[str, typer.Option("--coordinator", "-c", help="HOST:PORT")],
    token: Annotated[str, typer.Option("--token", help="enrollment token from an admin")],
    name: Annotated[str | None, typer.Option(help="contributor name (default: host name)")] = None,
    tls_ca: TlsCa = None,
) -> None:
    """Join a coordinator; stores the credential in a 0600 file."""
    with client(coordinator, None, tls_ca) as api:
        joined = guarded(lambda: api.join(token, name))
    typer.echo(
        f"joined as {joined.name} ({joined.contributor_id}); "
        f"credential saved in {joined.config_path}"
    )


def upload(
    expert_dir: Annotated[Path, typer.Argument(help="folder with the expert's four files")],
    name: Annotated[str | None, typer.Option(help="expert name (default: folder name)")] = None,
    task_name: Annotated[
        str | None, typer.Option(help="task name (default: statistics.json)")
    ] = None,
    description: Annotated[str | None, typer.Option(help="task description")] = None,
    chunk_size: Annotated[int, typer.Option(help="bytes per chunk")] = 1024 * 1024,
    transport: Transport = TransportChoice.auto,
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
    no_statistics: Annotated[
        bool,
        typer.Option(
            "--no-statistics",
            help="a bare PEFT adapter folder whose data is gone: upload it as an adapter-only "
            "expert (needs --task-name; routed by Arrow, left out by statistics routers)",
        ),
    ] = False,
    labels: Annotated[
        str | None,
        typer.Option(help="--no-statistics: the head's label names in order, comma-separated"),
    ] = None,
) -> None:
    """Upload an expert folder (resumes an interrupted upload)."""
    # the progress bar is on stderr: shown with --json too, whose JSON alone is on stdout
    if no_statistics and not task_name:
        raise typer.BadParameter("--no-statistics needs --task-name")
    with client(coordinator, token, tls_ca) as api:
        if no_statistics:
            label_names = [x.strip() for x in labels.split(",")] if labels else None
            result = guarded(
                lambda: api.upload_adapter(
                    expert_dir,
                    str(task_name),
                    name,
                    label_names=label_names,
                    description=description or "",
                    transport=transport.value,
                    chunk_size=chunk_size,
                    progress=True,
                )
            )
        else:
            result = guarded(
                lambda: api.upload(
                    expert_dir,
                    name,
                    task_name=task_name,
                    description=description,
                    transport=transport.value,
                    chunk_size=chunk_size,
                    progress=True,
                )
            )
    if json_out:
        emit_json(result)
        return
    e = result.expert
    verb = "registered" if result.created else "already registered"
    typer.echo(f"{verb}: expert {e.expert_id} ({e.name} v{e.version}, task {e.task_name})")


def my_experts(
    coordinator: Coordinator = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    json_out: Json = False,
) -> None:
    """List the experts this contributor has registered: state and its reason, validation quality
    beside its baselines, and privacy (what each releases under which epsilon; ``--json`` gives
    the whole report)."""
    with client(coordinator, token, tls_ca) as api:
        experts = guarded(api.my_experts)
    if json_out:
        emit_json({"experts": experts})
        return
    rows = [
        (
            e.expert_id[:12],
            e.name,
            e.version,
            e.task_name,
            e.state,
            e.example_count,
            e.quality.summary() if e.quality else "",
            e.privacy_report.summary() if e.privacy_report else "",
            e.state_reason,
        )
        for e in experts
    ]
    columns = ("id", "name", "v", "task", "state", "examples", "quality", "privacy", "reason")
    table("my experts", columns, rows)


def register_node_key(target: Target, public_key: str) -> None:
    """Register the node's public key under this contributor's credential; say whether the
    coordinator's SuperLink admits it."""
    from moerge.client import Client

    client = Client()
    client.target = target
    with client:
        done = client.register_node_key(public_key)
    if done.admitted:
        typer.echo(f"node key {done.node_key_id[:12]} admitted (SuperNode {done.flower_node_id})")
    else:
        typer.echo(
            f"node key {done.node_key_id[:12]} recorded; the coordinator's SuperLink does not "
            "check node keys (no TLS, or a SuperLink it did not start)"
        )


def node_key(
    private_key: Path | None = typer.Option(
        None, help="Your own OpenSSH ECDSA private key (default: the one under MOERGE_HOME)."
    ),
) -> None:
    """Create this machine's SuperNode key pair (once) and register it with the coordinator."""
    path, public = _node_key_pair(private_key)
    typer.echo(f"{path}: {public}")
    register_node_key(Target.resolve(None, None, None), public)


def serve(
    superlink: str = typer.Option(..., help="Coordinator's SuperLink Fleet API, host:port."),
    data: Path | None = typer.Option(
        None,
        exists=True,
        dir_okay=False,
        help="Your data file, as `moerge train` reads it (.jsonl, .csv, .parquet); embedded "
        "here with the base model.",
    ),
    text_field: str = typer.Option("text", help="Field of --data holding the text."),
    expert: str = typer.Option(
        "",
        help="Your expert: its name (newest active version), id or id prefix "
        "(default: your only active expert).",
    ),
    expert_id: str = typer.Option("", help="Your expert's id as is (no lookup; see --expert)."),
    embeddings: Path | None = typer.Option(
        None,
        exists=True,
        dir_okay=False,
        help="Instead of --data: a safetensors file with the tensor 'embeddings' [n, H].",
    ),
    base_model: str | None = typer.Option(None, help="Local base model folder (with --data)."),
    offline: bool = typer.Option(False, help="Do not ask the coordinator for the base model."),
    root_certificates: Path | None = typer.Option(None, help="Coordinator CA certificate (PEM)."),
    private_key: Path | None = typer.Option(
        None,
        help="SuperNode OpenSSH ECDSA private key (default: created under MOERGE_HOME); its "
        "public key is registered with the coordinator before the node starts.",
    ),
    insecure: bool = typer.Option(
        False, help="No TLS and no node key (local testing only: node keys need TLS)."
    ),
    contributor_id: str = typer.Option(
        "",
        help="Contributor id the coordinator records for this node's rounds "
        "(default: the one `moerge join` saved).",
    ),
    node_port: int = typer.Option(
        0, help="Port of the SuperNode's local runtime API (0: Flower's default, 9094)."
    ),
    dry_run: bool = typer.Option(False, help="Print the flower-supernode command and exit."),
) -> None:
    """Serve federated router rounds from your own data (a Flower SuperNode)."""
    if (data is None) == (embeddings is None):
        raise typer.BadParameter("give exactly one of --data and --embeddings")
    target = Target.resolve(None, None, None)
    expert_id = expert_id or own_expert_id(target, expert)
    if data is not None:
        model_path, info = agreed_base_model(base_model, offline, target)
        embeddings = embed_data(data, text_field, model_path, info)
    assert embeddings is not None
    if not insecure:  # Flower authenticates nodes over TLS only
        private_key, public = _node_key_pair(private_key)
        if not dry_run:
            register_node_key(target, public)
    argv = supernode_command(
        superlink,
        embeddings,
        expert_id,
        root_certificates=root_certificates,
        private_key=private_key,
        insecure=insecure,
        contributor_id=contributor_id or ClientConfig.load().contributor_id,
        node_port=node_port,
    )
    typer.echo(shlex.join(argv))
    if not dry_run:
        os.execvp(argv[0], argv)


def own_expert_id(target: Target, expert: str) -> str:
    """The id of one of this contributor's experts: by name (its newest active version), by
    id or id prefix, or, with ``expert`` empty, the only active one."""
    from moerge.client import Client, unique_prefix

    client = Client()
    client.target = target
    with client:
        mine = client.my_experts()
        active = [e for e in mine if e.state == "active"]
        named = [e for e in active if e.name == expert] if expert else active
        if named and (expert or len(named) == 1):
            return max(named, key=lambda e: e.version).expert_id
        if not expert:
            names = sorted({e.name for e in active}) or ["none"]
            raise typer.BadParameter(
                f"name your expert with --expert (active ones: {', '.join(names)})"
            )
        return unique_prefix("expert", expert, [e.expert_id for e in mine])  # its own only


def _node_key_pair(private_key: Path | None) -> tuple[Path, str]:
    """:func:`~moerge.contributor_client.supernode.node_key_pair`; a bad key file is a bad
    parameter."""
    try:
        return node_key_pair(private_key)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


#: ``moerge contributor ...``: the contributor's side of federated router rounds.
supernode_app = typer.Typer(help="Contributor-side federated router rounds.", no_args_is_help=True)
supernode_app.command()(serve)
supernode_app.command("node-key")(node_key)
