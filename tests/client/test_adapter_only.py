"""Adapter-only experts: a bare PEFT folder joins; routers that need data skip it.

A real coordinator (SQLite, 127.0.0.1:0) and the tiny BERT; the CLI and the Python client both
upload over gRPC as a contributor would.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import moerge
from moerge.cli import app
from moerge.contributor_client.adapter_only import write_adapter_only
from moerge.contributor_client.upload import upload_expert
from moerge.errors import MoergeError
from moerge.expert_format import (
    STATISTICS_META,
    STATISTICS_TENSORS,
    StatisticsMeta,
    adapter_only_meta,
)
from tests.coordinator.harness import BackgroundCoordinator
from tests.experts import make_expert_dir


def _bare_adapter(tiny_bert: Path, out: Path, labels: tuple[str, ...], seed: int) -> Path:
    """Only PEFT's two files, as an adapter downloaded from elsewhere has."""
    folder = make_expert_dir(tiny_bert, out, labels=labels, seed=seed, task_name="unused")
    (folder / STATISTICS_META).unlink()
    (folder / STATISTICS_TENSORS).unlink()
    return folder


@pytest.fixture
def mixed(running: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path) -> dict[str, str]:
    """One expert with statistics and gates (Python client) and one adapter-only (CLI)."""
    with moerge.Client(running.address, token=running.admin_token()) as admin:
        invite = admin.create_enrollment_token().token
    with moerge.Client(running.address) as lab:
        lab.join(invite, "lab")
        full = lab.upload(make_expert_dir(tiny_bert, tmp_path / "full", task_name="films"), "full")
    bare = _bare_adapter(tiny_bert, tmp_path / "hub-adapter", ("sport", "tech", "money"), seed=3)
    result = CliRunner().invoke(app, [
        "upload", str(bare), "--no-statistics", "--task-name", "news",
        "--labels", "sport,tech,money", "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    uploaded = json.loads(result.stdout)  # the progress bar is on stderr
    return {"full": full.expert.expert_id, "bare": uploaded["expert"]["expert_id"]}


def test_a_bare_peft_folder_uploads_as_an_adapter_only_expert(
    running: BackgroundCoordinator, mixed: dict[str, str]
) -> None:
    with moerge.Client(running.address, token=running.admin_token()) as admin:
        expert = admin.get_expert(mixed["bare"])
    assert expert.task_name == "news" and expert.example_count == 0
    assert list(expert.label_names) == ["sport", "tech", "money"]


def test_statistics_routers_leave_adapter_only_experts_out_and_say_so(
    running: BackgroundCoordinator, mixed: dict[str, str]
) -> None:
    with moerge.Client(running.address, token=running.admin_token()) as admin:
        for method in ("centroid", "lda", "phatgoose"):
            version = admin.train_router(method, activate=False)
            assert version.status == "ready", version.error
            assert version.expert_ids == (mixed["full"],), method
            assert version.metrics["skipped_experts"] == 1.0


def test_arrow_routes_a_mixed_library_including_adapter_only_experts(
    running: BackgroundCoordinator, mixed: dict[str, str]
) -> None:
    with moerge.Client(running.address, token=running.admin_token()) as admin:
        version = admin.train_router("arrow")
        assert set(version.expert_ids) == {mixed["full"], mixed["bare"]}
        assert version.metrics["skipped_experts"] == 0.0
        texts = ["the film was great", "stocks fell", "a goal in the last minute", "ok"]
        result = admin.predict(texts, method="arrow")
        chosen = {max(p.experts, key=lambda e: e.weight).expert_id for p in result.predictions}
        assert chosen <= {mixed["full"], mixed["bare"]}
        for p in result.predictions:  # the head of the expert chosen: its own labels
            top = max(p.experts, key=lambda e: e.weight).expert_id
            labels = {"neg", "pos"} if top == mixed["full"] else {"sport", "tech", "money"}
            assert p.output in labels
        pinned = admin.predict(["stocks fell"], experts=[mixed["bare"]])
        assert pinned.predictions[0].output in {"sport", "tech", "money"}


def test_a_library_of_adapter_only_experts_cannot_fit_a_statistics_router(
    running: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path
) -> None:
    with moerge.Client(running.address, token=running.admin_token()) as admin:
        invite = admin.create_enrollment_token().token
        with moerge.Client(running.address) as lab:
            lab.join(invite, "lab")
            bare = _bare_adapter(tiny_bert, tmp_path / "a", ("neg", "pos"), seed=1)
            upload = lab.upload_adapter(bare, "films", label_names=["neg", "pos"])
            assert upload.created and upload.expert.example_count == 0
        with pytest.raises(MoergeError, match="learns from statistics"):
            admin.train_router("lda")
        assert admin.train_router("arrow").expert_ids == (upload.expert.expert_id,)


def test_the_coordinator_refuses_adapter_only_statistics_that_claim_data(
    running: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path
) -> None:
    """Sent as raw files (past the client's own check): a count, or a tensor, is refused."""
    bare = _bare_adapter(tiny_bert, tmp_path / "a", ("neg", "pos"), seed=1)
    counted = write_adapter_only(bare, tmp_path / "counted", "films")
    meta = json.loads((counted / STATISTICS_META).read_text())
    (counted / STATISTICS_META).write_text(json.dumps({**meta, "example_count": 40}))
    summarised = write_adapter_only(bare, tmp_path / "summarised", "films")
    save_file({"embedding.mean": torch.zeros(32)}, str(summarised / STATISTICS_TENSORS))
    with moerge.Client(running.address, token=running.admin_token()) as admin:
        invite = admin.create_enrollment_token().token
    with moerge.Client(running.address) as lab:
        lab.join(invite, "lab")
        for folder, why in ((counted, "example_count"), (summarised, "carries no statistics")):
            with pytest.raises(grpc.RpcError) as caught:
                upload_expert(lab.target, folder, folder.name, "films", progress=False)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert why in caught.value.details()


def test_adapter_only_meta_claims_no_data_and_labels_default_to_transformers_names(
    tiny_bert: Path, tmp_path: Path
) -> None:
    staged = write_adapter_only(
        _bare_adapter(tiny_bert, tmp_path / "a", ("x", "y", "z"), seed=2), tmp_path / "e", "t"
    )
    meta = StatisticsMeta.read(staged / STATISTICS_META)
    assert not meta.embedding_statistics and meta.example_count == 0
    assert meta.label_names == ["LABEL_0", "LABEL_1", "LABEL_2"]
    with pytest.raises(ValueError, match="gate_modules"):
        meta_with_gates = adapter_only_meta("t", 32, ["a", "b"])
        meta_with_gates.gate_modules = ["encoder.layer.0.attention.self.query"]
        meta_with_gates.validate()
    with pytest.raises(ValueError, match="label names for a head of 2"):
        write_adapter_only(
            _bare_adapter(tiny_bert, tmp_path / "b", ("x", "y"), seed=2), tmp_path / "f", "t",
            label_names=["only-one"],
        )  # fmt: skip
