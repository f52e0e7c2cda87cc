"""moerge.Client and moerge.AsyncClient against a real coordinator: typed results, one error."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

import moerge
from moerge.contributor_client.connection import ClientConfig
from moerge.results import Expert, Page, Predictions, Routing, Upload
from tests.coordinator.harness import BackgroundCoordinator
from tests.experts import make_expert_dir

LABELS = (("neg", "pos"), ("sport", "tech", "money"))


def _contributor(running: BackgroundCoordinator, name: str = "lab") -> moerge.Client:
    admin = moerge.Client(running.address, token=running.admin_token())
    with admin:
        invite = admin.create_enrollment_token(note=name)
    client = moerge.Client(running.address)
    client.join(invite.token, name)
    return client


def _upload_two(client: moerge.Client, tiny_bert: Path, tmp_path: Path) -> list[Upload]:
    uploads = []
    for i, labels in enumerate(LABELS):
        folder = make_expert_dir(
            tiny_bert, tmp_path / f"e{i}", labels=labels, seed=i, task_name=f"task{i}"
        )
        uploads.append(client.upload(folder, f"expert{i}"))
    return uploads


def test_a_contributor_joins_uploads_and_sees_its_experts_as_dataclasses(
    running: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path, client_home: Path
) -> None:
    with _contributor(running) as client:
        saved = ClientConfig.load()
        assert saved.coordinator == running.address and saved.credential == client.target.token
        assert (client_home / "client.json").stat().st_mode & 0o777 == 0o600
        first, second = _upload_two(client, tiny_bert, tmp_path)
        assert first.created and second.created
        assert first.expert.task_name == "task0" and first.expert.label_names == ("neg", "pos")
        again = client.upload(tmp_path / "e0", "expert0")
        assert not again.created and again.expert.expert_id == first.expert.expert_id
        mine = client.my_experts()
        assert {e.name: e.state for e in mine} == {"expert0": "active", "expert1": "active"}
        assert all(isinstance(e, Expert) and e.created_at is not None for e in mine)
        assert client.base_model().base_model_id == "tiny-bert"


def test_predict_and_route_return_typed_results_with_numbers_as_numbers(
    running: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path
) -> None:
    with _contributor(running) as contributor:
        _upload_two(contributor, tiny_bert, tmp_path)
    with moerge.Client(running.address, token=running.admin_token()) as admin:
        version = admin.train_router("lda")
        assert version.status == "ready" and version.active and isinstance(version.version, int)
        result = admin.predict(["the film was great", "the bank stock fell"], top_k=1)
        assert isinstance(result, Predictions) and result.router_version == version.version
        assert {p.output for p in result.predictions} <= {"neg", "pos", "sport", "tech", "money"}
        assert all(len(p.experts) == 1 and p.experts[0].weight > 0 for p in result.predictions)
        routing = admin.route(["the film was great"], top_k=2)
        assert isinstance(routing, Routing) and len(routing.decisions[0]) == 2
        as_json = json.loads(json.dumps(result.to_dict()))
        assert as_json["router_version"] == version.version  # a number, not "2"
        assert isinstance(as_json["predictions"][0]["confidence"], float)


def test_admin_calls_use_the_clis_words_for_states(
    running: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path
) -> None:
    with _contributor(running) as contributor:
        uploads = _upload_two(contributor, tiny_bert, tmp_path)
    expert_id = uploads[0].expert.expert_id
    with moerge.Client(running.address, token=running.admin_token()) as admin:
        page = admin.list_experts(page_size=1)
        assert isinstance(page, Page) and len(page.items) == 1 and page.next_page_token
        quarantined = admin.set_expert_state(expert_id, "quarantined", reason="odd statistics")
        assert (quarantined.state, quarantined.state_reason) == ("quarantined", "odd statistics")
        assert [e.expert_id for e in admin.list_experts(state="quarantined").items] == [expert_id]
        assert admin.get_expert(expert_id).to_dict()["state"] == "quarantined"
        (lab,) = admin.list_contributors().items
        assert lab.name == "lab" and not lab.revoked and lab.created_at is not None
        assert admin.revoke_contributor(lab.contributor_id, reason="left").revoked
        actions = {e.action for e in admin.audit_log().items}
        assert {"expert.set_state", "contributor.revoke"} <= actions
        deleted = admin.delete_expert(expert_id)
        assert deleted.blobs_removed > 0 and deleted.bytes_freed > 0


def test_every_failure_is_a_moerge_error_with_the_status_code(
    running: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path
) -> None:
    with moerge.Client(running.address, token=running.admin_token()) as admin:
        with pytest.raises(moerge.MoergeError) as missing:
            admin.get_expert("0" * 32)
        assert missing.value.code == grpc.StatusCode.NOT_FOUND and missing.value.message
        with pytest.raises(moerge.MoergeError, match="state must be one of") as bad:
            admin.set_expert_state("0" * 32, "asleep")
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with _contributor(running) as contributor:
        with pytest.raises(moerge.MoergeError) as denied:
            contributor.list_experts()
        assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(moerge.MoergeError, match=r"has no statistics\.json") as empty:
            contributor.upload(tmp_path)
        assert empty.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_an_unreachable_coordinator_is_unavailable_with_a_hint() -> None:
    client = moerge.Client("127.0.0.1:1", token="x", timeout=10)
    with client, pytest.raises(moerge.MoergeError) as error:
        client.route(["hello"])
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert error.value.hint == "is a coordinator listening at 127.0.0.1:1?"
    assert "is a coordinator listening at 127.0.0.1:1?" in str(error.value)


def test_async_client_awaits_the_same_calls(
    running: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path
) -> None:
    folder = make_expert_dir(tiny_bert, tmp_path / "e", labels=("neg", "pos"), task_name="t")

    async def scenario() -> None:
        async with moerge.AsyncClient(running.address, token=running.admin_token()) as admin:
            invite = await admin.create_enrollment_token(note="async")
            async with moerge.AsyncClient(running.address) as contributor:
                joined = await contributor.join(invite.token, "async-lab", save=False)
                assert joined.config_path is None and contributor.target.token
                upload = await contributor.upload(folder, "e")
                assert upload.created
                assert [e.name for e in await contributor.my_experts()] == ["e"]
            routing, page = await asyncio.gather(
                admin.route(["hello", "world"]), admin.list_experts()
            )
            assert len(routing.decisions) == 2 and len(page.items) == 1
            with pytest.raises(moerge.MoergeError) as missing:
                await admin.get_expert("0" * 32)
            assert missing.value.code == grpc.StatusCode.NOT_FOUND

    asyncio.run(scenario())
    assert not ClientConfig.path().exists()  # save=False


def test_contribute_trains_against_the_coordinators_base_model_and_uploads(
    running: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path
) -> None:
    from tests.contributor_client.toy import toy_examples, write_jsonl

    data = write_jsonl(tmp_path / "data.jsonl", *toy_examples(60))
    with _contributor(running) as client:
        upload, report = client.contribute(
            data,
            "toy",
            base_model=str(tiny_bert),
            out=tmp_path / "kept",
            epochs=1,
            gates=False,
            stats_rank=4,
            max_length=16,
            no_dp=True,
        )  # fmt: skip  (no_dp: the exact count; DP noisy counts are tested elsewhere)
        assert upload.created and upload.expert.task_name == "toy"
        assert set(upload.expert.label_names) == {"sport", "finance"}
        assert report.meta.example_count == 60 and (tmp_path / "kept").is_dir()
        with pytest.raises(moerge.MoergeError, match="exceeds the coordinator's maximum") as big:
            client.train(data, "toy", tmp_path / "big", base_model=str(tiny_bert), rank=4096)
        assert big.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
            client.train(data, "toy", tmp_path / "typo", base_model=str(tiny_bert), epoch=1)


def test_every_client_method_the_docs_call_exists() -> None:
    import re

    text = (Path(__file__).parents[2] / "docs" / "python-client.md").read_text(encoding="utf-8")
    called = set(re.findall(r"\b(?:client|admin)\.([a-z_]+)\(", text))
    assert {"predict", "generate", "contribute", "list_experts"} <= called
    assert not {name for name in called if not hasattr(moerge.Client, name)}
    assert not {name for name in called if not hasattr(moerge.AsyncClient, name)}
