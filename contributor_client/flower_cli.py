"""``moerge contributor serve``: run this contributor's Flower SuperNode for router rounds.

A contributor joins federated router rounds (:mod:`moerge.router_training.federated`) by running
a Flower SuperNode (``flower-supernode``) that connects out to the coordinator's SuperLink; the
SuperLink then runs :data:`app` -- the ``ClientApp`` of :mod:`moerge.router_training.
flower_client` -- on the node for each round. The node's local data is named by its node config:

* ``embeddings-path``: a safetensors file with one tensor ``embeddings`` [n, H], the
  :func:`~moerge.embedding.pooled_embeddings` of the contributor's own data
  (``moerge contributor serve --data FILE`` embeds the data file ``moerge train`` read, with
  the same base model, and caches the result under ``$MOERGE_HOME/federated``);
* ``expert-id``: the id of the contributor's expert, the label of every row (``--expert``
  takes its name; by default the contributor's only active expert);
* ``contributor-id``: the contributor id ``moerge join`` saved (or ``--contributor-id``), which
  the ClientApp returns with every update so the coordinator records who took part. It is
  self-reported: bind it to the node with SuperNode authentication (the key pair below).

Only the router's weights and the example count ever leave the node. The node's credential is
its key pair (``--auth-supernode-private-key``): ``moerge contributor serve`` (or ``moerge
contributor node-key``) creates one under ``$MOERGE_HOME/federated`` and registers its public
key with the coordinator under the contributor's moerge credential (``RegisterNodeKey``); the
coordinator's SuperLink (Flower's node authentication) admits the nodes of enrolled, unrevoked
contributors only. TLS uses the coordinator's root certificate.

torch, safetensors and flwr are imported where they are used (and :data:`app` is built on first
access), so that ``moerge --help`` does not pay for them.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from moerge.contributor_client.connection import ClientConfig, Target

if TYPE_CHECKING:
    import torch
    from flwr.app import Context
    from flwr.clientapp import ClientApp

    from moerge.router_training.federated_base import ContributorData


def save_local_embeddings(path: str | Path, embeddings: torch.Tensor) -> None:
    """Write ``embeddings`` [n, H] where :func:`load_node_data` reads them (never pickled)."""
    import torch
    from safetensors.torch import save_file

    save_file({"embeddings": embeddings.detach().to(torch.float32).contiguous().cpu()}, str(path))


def load_node_data(context: Context) -> ContributorData:
    """The node's own embeddings and expert id, from its node config (see module docstring)."""
    from safetensors.torch import load_file

    from moerge.router_training.federated_base import ContributorData

    config = context.node_config
    try:
        path, expert_id = str(config["embeddings-path"]), str(config["expert-id"])
    except KeyError as exc:
        hint = "start the node with `moerge contributor serve`"
        raise ValueError(f"node config lacks {exc}; {hint}") from None
    embeddings = load_file(path)["embeddings"]
    return ContributorData.single_expert(embeddings, expert_id)


def __getattr__(name: str) -> ClientApp:
    """``app``: the ClientApp a SuperLink runs on this node (``clientapp = "...flower_cli:app"``
    in the FAB), built on first access so that importing this module stays light."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from moerge.router_training.flower_client import make_client_app

    global app
    app = make_client_app(load_node_data)
    return app


def node_key_pair(private_key: Path | None = None) -> tuple[Path, str]:
    """The SuperNode's private key file and its public key (OpenSSH text). Without
    ``private_key``, the node key under ``$MOERGE_HOME/federated``, created on first use: an
    ECDSA P-384 key in OpenSSH format, as Flower's node authentication reads it (what
    ``ssh-keygen -t ecdsa -b 384`` writes), readable by this user only."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from moerge.contributor_client.connection import client_home

    openssh_public = serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    if private_key is None:
        private_key = client_home() / "federated" / "node-key"
        if not private_key.exists():
            key = ec.generate_private_key(ec.SECP384R1())
            private_key.parent.mkdir(parents=True, exist_ok=True)
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
            fd = os.open(private_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
            public = key.public_key().public_bytes(*openssh_public).decode()
            private_key.with_name("node-key.pub").write_text(public + "\n", encoding="utf-8")
    try:
        key = serialization.load_ssh_private_key(private_key.read_bytes(), None)
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(f"{private_key}: not an OpenSSH private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise typer.BadParameter(f"{private_key}: not an ECDSA key (Flower needs one)")
    return private_key, key.public_key().public_bytes(*openssh_public).decode()


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
    path, public = node_key_pair(private_key)
    typer.echo(f"{path}: {public}")
    register_node_key(Target.resolve(None, None, None), public)


def supernode_command(
    superlink: str,
    embeddings: Path,
    expert_id: str,
    *,
    root_certificates: Path | None,
    private_key: Path | None,
    insecure: bool,
    contributor_id: str = "",
    node_port: int = 0,
) -> list[str]:
    """The ``flower-supernode`` argv that serves :data:`app` with this contributor's data."""
    from moerge.router_training.flower_client import CONTRIBUTOR_ID

    values = {"embeddings-path": str(embeddings.resolve()), "expert-id": expert_id}
    if contributor_id:
        values[CONTRIBUTOR_ID] = contributor_id
    # TOML strings: Flower parses node-config values as TOML
    node_config = " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())
    argv = ["flower-supernode", "--superlink", superlink, "--node-config", node_config]
    if node_port:
        argv += ["--port", str(node_port)]
    if insecure:
        argv.append("--insecure")
    elif root_certificates is not None:
        argv += ["--root-certificates", str(root_certificates)]
    if private_key is not None:
        argv += ["--auth-supernode-private-key", str(private_key)]
    return argv


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
        embeddings = embed_data(target, data, text_field, base_model, offline)
    assert embeddings is not None
    if not insecure:  # Flower authenticates nodes over TLS only
        private_key, public = node_key_pair(private_key)
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


def embed_data(
    target: Target, data: Path, text_field: str, base_model: str | None, offline: bool
) -> Path:
    """Embed the texts of ``data`` with the agreed base model (as the statistics were) into a
    file under ``$MOERGE_HOME/federated``, named by the data's and the model's digests so that
    a restart reuses it. Nothing leaves this machine."""
    import hashlib

    from transformers import AutoModel

    from moerge.contributor_client.batching import load_tokenizer
    from moerge.contributor_client.connection import client_home
    from moerge.contributor_client.data import load_examples
    from moerge.contributor_client.train_cli import agreed_base_model
    from moerge.embedding import pooled_embeddings

    model_path, info = agreed_base_model(base_model, offline, target)
    digest = hashlib.sha256(data.read_bytes())
    digest.update(f"\n{text_field}\n{info.revision if info else model_path}".encode())
    path = client_home() / "federated" / f"embeddings-{digest.hexdigest()[:32]}.safetensors"
    if not path.exists():
        texts = load_examples(data, text_field, label_field=None).texts
        model = AutoModel.from_pretrained(str(model_path))
        tokenizer = load_tokenizer(str(model_path))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_local_embeddings(path, pooled_embeddings(model, tokenizer, texts))  # [n, H]
    return path


def register(parent: typer.Typer) -> None:
    """Attach ``moerge contributor serve`` to the top-level app."""
    group = typer.Typer(help="Contributor-side federated router rounds.", no_args_is_help=True)
    group.command()(serve)
    group.command("node-key")(node_key)
    parent.add_typer(group, name="contributor")
