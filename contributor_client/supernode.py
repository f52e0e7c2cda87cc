"""This contributor's Flower SuperNode for router rounds: its data, its key, its command line.

The commands (``moerge contributor serve|node-key``) are in :mod:`moerge.cli.contributor`;
this module holds what they run.

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
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from flwr.app import Context
    from flwr.clientapp import ClientApp

    from moerge.results import BaseModel
    from moerge.router_training.federated_base import ContributorData

#: Declared, not bound: the module's __getattr__ builds it on first access (see below).
app: ClientApp


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
    """``app``: the ClientApp a SuperLink runs on this node (``clientapp = "...supernode:app"``
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
            new_key = ec.generate_private_key(ec.SECP384R1())
            private_key.parent.mkdir(parents=True, exist_ok=True)
            pem = new_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
            fd = os.open(private_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
            public = new_key.public_key().public_bytes(*openssh_public).decode()
            private_key.with_name("node-key.pub").write_text(public + "\n", encoding="utf-8")
    try:
        key = serialization.load_ssh_private_key(private_key.read_bytes(), None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{private_key}: not an OpenSSH private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{private_key}: not an ECDSA key (Flower needs one)")
    return private_key, key.public_key().public_bytes(*openssh_public).decode()


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


def embed_data(data: Path, text_field: str, model_path: str, info: BaseModel | None) -> Path:
    """Embed the texts of ``data`` with the agreed base model (as the statistics were) into a
    file under ``$MOERGE_HOME/federated``, named by the data's and the model's digests so that
    a restart reuses it. Nothing leaves this machine."""
    import hashlib

    from transformers import AutoModel

    from moerge.contributor_client.batching import load_tokenizer
    from moerge.contributor_client.connection import client_home
    from moerge.contributor_client.data import load_examples
    from moerge.embedding import pooled_embeddings

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
