"""``moerge contributor serve --data FILE --expert NAME``: no hand-made embeddings, no pasted id."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel
from typer.testing import CliRunner

from moerge.cli import app
from moerge.contributor_client.batching import load_tokenizer
from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import upload_expert
from moerge.coordinator.config import CoordinatorConfig
from moerge.embedding import pooled_embeddings
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator
from tests.coordinator.test_server import enroll
from tests.experts import make_expert_dir

TEXTS = ["a fine film", "the plot dragged", "great acting"]


@pytest.fixture
def joined(tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch):
    """A coordinator, one contributor (through MOERGE_* variables) with two experts."""
    config: CoordinatorConfig = coordinator_config(tmp_path / "data", tiny_bert)
    with BackgroundCoordinator(config) as running:
        _, credential = enroll(running.address, running.admin_token(), "lab")
        target = Target(address=running.address, token=credential)
        ids = {}
        for i, name in enumerate(("sentiment", "topics")):
            folder = make_expert_dir(tiny_bert, tmp_path / name, seed=i, task_name=name)
            ids[name] = upload_expert(target, folder, name, name, progress=False).expert.expert_id
        monkeypatch.setenv("MOERGE_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("MOERGE_COORDINATOR", running.address)
        monkeypatch.setenv("MOERGE_TOKEN", credential)
        data = tmp_path / "mine.jsonl"
        data.write_text("".join(json.dumps({"text": t, "label": "x"}) + "\n" for t in TEXTS))
        yield running, ids, data


def _serve(*options: str) -> list[str]:
    result = CliRunner().invoke(
        app,
        [
            "contributor",
            "serve",
            "--superlink",
            "127.0.0.1:9092",
            "--insecure",
            "--dry-run",
            *options,
        ],
    )
    assert result.exit_code == 0, result.output
    return shlex.split(result.output.strip().splitlines()[-1])


def _node_config(argv: list[str]) -> dict[str, str]:
    raw = argv[argv.index("--node-config") + 1]  # key="TOML string" pairs
    return {k: json.loads(v) for k, v in re.findall(r'([\w-]+)=("(?:[^"\\]|\\.)*")', raw)}


def test_serve_embeds_the_data_file_and_finds_the_expert_by_name(joined, tiny_bert: Path) -> None:
    _, ids, data = joined
    argv = _serve(
        "--data", str(data), "--expert", "topics", "--base-model", str(tiny_bert), "--offline"
    )
    config = _node_config(argv)
    assert config["expert-id"] == ids["topics"]
    stored = load_file(config["embeddings-path"])["embeddings"]  # [n, H]
    model = AutoModel.from_pretrained(str(tiny_bert))
    expected = pooled_embeddings(model, load_tokenizer(str(tiny_bert)), TEXTS)
    torch.testing.assert_close(stored, expected.float())
    # the same data and model again: the cached file, not a second embedding pass
    assert (
        _node_config(
            _serve(
                "--data",
                str(data),
                "--expert",
                "topics",
                "--base-model",
                str(tiny_bert),
                "--offline",
            )
        )
        == config
    )
    # a unique prefix of the id names it too (among the contributor's own experts only)
    assert (
        _node_config(
            _serve(
                "--data",
                str(data),
                "--expert",
                ids["topics"][:6],
                "--base-model",
                str(tiny_bert),
                "--offline",
            )
        )
        == config
    )


def test_serve_needs_a_name_when_the_contributor_has_several_experts(
    joined, tiny_bert: Path
) -> None:
    _, _, data = joined
    result = CliRunner().invoke(
        app,
        [
            "contributor",
            "serve",
            "--superlink",
            "127.0.0.1:9092",
            "--insecure",
            "--dry-run",
            "--data",
            str(data),
            "--base-model",
            str(tiny_bert),
            "--offline",
        ],
    )
    assert result.exit_code != 0
    assert "--expert" in result.output and "sentiment" in result.output
