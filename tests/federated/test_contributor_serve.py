"""``moerge contributor serve``: the SuperNode command and the node's own data loader."""

from __future__ import annotations

import shlex

import torch
from flwr.app import Context, RecordDict
from typer.testing import CliRunner

from moerge.cli import app
from moerge.contributor_client.supernode import load_node_data, save_local_embeddings


def test_serve_dry_run_prints_a_supernode_command_with_data_and_node_key(tmp_path, monkeypatch):
    embeddings = tmp_path / "emb.safetensors"
    save_local_embeddings(embeddings, torch.randn(5, 8))
    monkeypatch.setenv("MOERGE_HOME", str(tmp_path / "home"))
    key = tmp_path / "home" / "federated" / "node-key"  # created by the dry run
    ca = tmp_path / "ca.pem"
    result = CliRunner().invoke(
        app,
        [
            "contributor",
            "serve",
            "--superlink",
            "coord:9092",
            "--embeddings",
            str(embeddings),
            "--expert-id",
            "expert-7",
            "--root-certificates",
            str(ca),
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    argv = shlex.split(result.output.strip())
    assert argv[:3] == ["flower-supernode", "--superlink", "coord:9092"]
    node_config = argv[argv.index("--node-config") + 1]
    assert f'embeddings-path="{embeddings.resolve()}"' in node_config  # TOML strings
    assert 'expert-id="expert-7"' in node_config
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(key)
    assert key.exists() and key.with_name("node-key.pub").read_text().startswith("ecdsa-sha2-")
    assert argv[argv.index("--root-certificates") + 1] == str(ca)
    assert "--insecure" not in argv


def test_serve_names_the_contributor_and_the_node_port(tmp_path, monkeypatch):
    monkeypatch.setenv("MOERGE_HOME", str(tmp_path / "home"))  # no saved client config
    embeddings = tmp_path / "emb.safetensors"
    save_local_embeddings(embeddings, torch.randn(5, 8))
    result = CliRunner().invoke(
        app,
        [
            "contributor",
            "serve",
            "--superlink",
            "127.0.0.1:9092",
            "--embeddings",
            str(embeddings),
            "--expert-id",
            "e 7",
            "--contributor-id",
            "c-1",
            "--node-port",
            "9301",
            "--insecure",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    argv = shlex.split(result.output.strip())
    node_config = argv[argv.index("--node-config") + 1]
    assert 'contributor-id="c-1"' in node_config and 'expert-id="e 7"' in node_config
    assert argv[argv.index("--port") + 1] == "9301" and "--insecure" in argv
    assert "--auth-supernode-private-key" not in argv  # node keys need TLS


def test_node_loads_its_own_embeddings_labelled_with_its_expert(tmp_path):
    embeddings = torch.randn(5, 8)
    path = tmp_path / "emb.safetensors"
    save_local_embeddings(path, embeddings)
    context = Context(
        run_id=1,
        node_id=3,
        state=RecordDict(),
        run_config={},
        node_config={"embeddings-path": str(path), "expert-id": "expert-7"},
    )
    data = load_node_data(context)
    torch.testing.assert_close(data.embeddings, embeddings)
    assert data.expert_ids == ["expert-7"] * 5
