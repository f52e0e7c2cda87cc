"""Uploading experts through the real server: commit, idempotency, versions, resume, refusals."""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
import socket
import struct
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import describe_files, make_manifest, upload_expert
from moerge.expert_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    STATISTICS_META,
    STATISTICS_TENSORS,
)
from moerge.v1 import contributor_pb2, contributor_pb2_grpc
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator
from tests.coordinator.snapshot import snapshot
from tests.coordinator.test_server import enroll
from tests.experts import make_expert_dir, rewrite_json


@pytest.fixture(scope="module")
def expert_template(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    return make_expert_dir(tiny_bert, tmp_path_factory.mktemp("experts") / "template")


@pytest.fixture
def expert(tmp_path: Path, expert_template: Path) -> Path:
    target = tmp_path / "expert"
    shutil.copytree(expert_template, target)
    return target


def _target(coordinator: BackgroundCoordinator, name: str = "alice") -> Target:
    _, credential = enroll(coordinator.address, coordinator.admin_token(), name)
    return Target(address=coordinator.address, token=credential)


def test_upload_registers_the_expert_and_reupload_is_idempotent(
    coordinator: BackgroundCoordinator, expert: Path
) -> None:
    target = _target(coordinator)
    first = upload_expert(target, expert, "sentiment", "toy", progress=False)
    assert first.created and first.expert.version == 1
    assert {f.name for f in first.expert.files} == {
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        STATISTICS_TENSORS,
        STATISTICS_META,
    }
    again = upload_expert(target, expert, "sentiment", "toy", progress=False)
    assert not again.created and again.expert.expert_id == first.expert.expert_id
    for f in first.expert.files:
        assert coordinator.state.blobs.verify(f.sha256)
    # new content under the same name is the next version
    weights = load_file(str(expert / ADAPTER_WEIGHTS))
    key = next(k for k in weights if "lora_B" in k)
    weights[key] = weights[key] + 0.5
    save_file(weights, str(expert / ADAPTER_WEIGHTS))
    second = upload_expert(target, expert, "sentiment", "toy", progress=False)
    assert second.created and second.expert.version == 2
    with grpc.insecure_channel(coordinator.address) as ch:
        mine = contributor_pb2_grpc.ContributorServiceStub(ch).ListMyExperts(
            contributor_pb2.ListMyExpertsRequest(), metadata=target.metadata()
        )
    assert sorted(e.version for e in mine.experts) == [1, 2]
    other = _target(coordinator, "bob")
    with grpc.insecure_channel(coordinator.address) as ch:
        theirs = contributor_pb2_grpc.ContributorServiceStub(ch).ListMyExperts(
            contributor_pb2.ListMyExpertsRequest(), metadata=other.metadata()
        )
        assert list(theirs.experts) == []
        with pytest.raises(grpc.RpcError) as err:  # bob cannot see alice's uploads
            contributor_pb2_grpc.ContributorServiceStub(ch).GetUploadStatus(
                contributor_pb2.GetUploadStatusRequest(
                    upload_id=make_manifest(
                        describe_files(expert), "sentiment", "toy", ""
                    ).upload_id
                ),
                metadata=other.metadata(),
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 that records every byte the client sends and (optionally) cuts
    its first connection after ``cut_after`` of them."""

    def __init__(self, upstream: str, cut_after: int | None) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.cut_after = cut_after
        self.cuts = 0
        self.client_bytes = bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._first = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            limit = self.cut_after if self._first else None
            self._first = False
            threading.Thread(
                target=self._pipe, args=(client, server, limit, True), daemon=True
            ).start()
            threading.Thread(
                target=self._pipe, args=(server, client, None, False), daemon=True
            ).start()

    def _pipe(
        self, source: socket.socket, sink: socket.socket, limit: int | None, record: bool
    ) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    sink.sendall(data[: limit - sent])  # what got through before the cut
                    if record:
                        self.client_bytes.extend(data[: limit - sent])
                    time.sleep(0.2)  # let the peer read it: a reset discards unread bytes
                    self.cuts += 1
                    for s in (source, sink):  # RST, not a clean close
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        # wake the other direction's blocked recv: until it returns, close()
                        # cannot release the socket and no RST goes out
                        with contextlib.suppress(OSError):
                            s.shutdown(socket.SHUT_RD)
                        s.close()
                    return
                sink.sendall(data)
                sent += len(data)
                if record:
                    self.client_bytes.extend(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self.listener.close()


def test_grpc_chunk_upload_resumes_from_the_coordinators_offset_after_a_cut_connection(
    coordinator: BackgroundCoordinator, expert: Path
) -> None:
    target = _target(coordinator)
    total = sum(f.size for f in describe_files(expert))
    proxy = CuttingProxy(coordinator.address, cut_after=total // 2)
    try:
        via_proxy = Target(address=proxy.address, token=target.token)
        response = upload_expert(
            via_proxy, expert, "resumed", "toy", chunk_size=4096, progress=False
        )
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert response.created
    manifest = make_manifest(describe_files(expert), "resumed", "toy", "")
    info = coordinator.state.registry.get_upload(
        coordinator.state.registry.authenticate(target.token).contributor_id, manifest.upload_id
    )
    assert info.state == "committed" and info.received_bytes == total
    audit = coordinator.state.registry.list_audit(page_size=1000).items
    assert (
        sum(
            1
            for a in audit
            if a.action.startswith("expert.register") or a.action == "upload.commit"
        )
        >= 1
    )


def _cut_half_way(coordinator: BackgroundCoordinator, target: Target, expert: Path) -> int:
    """Send part of the expert, then lose the connection for good; return the bytes held.

    The cut comes after as many bytes as the expert has; headers and framing ride in them.
    """
    total = sum(f.size for f in describe_files(expert))
    proxy = CuttingProxy(coordinator.address, cut_after=total)
    try:
        with pytest.raises(grpc.RpcError):
            upload_expert(
                Target(address=proxy.address, token=target.token),
                expert,
                "restarted",
                "toy",
                chunk_size=1024,
                max_attempts=1,
                progress=False,
            )
    finally:
        proxy.close()
    manifest = make_manifest(describe_files(expert), "restarted", "toy", "")
    contributor = coordinator.state.registry.authenticate(target.token).contributor_id
    return coordinator.state.uploads.status(contributor, manifest.upload_id).received_bytes


def test_upload_resumes_after_a_coordinator_restart(
    tmp_path: Path, tiny_bert: Path, db_url: str, expert: Path
) -> None:
    config = coordinator_config(tmp_path / "data", tiny_bert, db_url)
    with BackgroundCoordinator(config) as first:
        target = _target(first)
        held = _cut_half_way(first, target, expert)
    assert 0 < held < sum(f.size for f in describe_files(expert))
    with BackgroundCoordinator(config) as restarted:
        again = Target(address=restarted.address, token=target.token)
        manifest = make_manifest(describe_files(expert), "restarted", "toy", "")
        with grpc.insecure_channel(restarted.address) as ch:
            status = contributor_pb2_grpc.ContributorServiceStub(ch).GetUploadStatus(
                contributor_pb2.GetUploadStatusRequest(upload_id=manifest.upload_id),
                metadata=again.metadata(),
            )
        assert status.received_bytes == held  # re-hashed from the staged files, not resent
        response = upload_expert(again, expert, "restarted", "toy", progress=False)
        assert response.created
        for f in response.expert.files:
            assert restarted.state.blobs.verify(f.sha256)


def test_staged_bytes_corrupted_while_the_coordinator_was_down_fail_the_upload(
    tmp_path: Path, tiny_bert: Path, db_url: str, expert: Path
) -> None:
    config = coordinator_config(tmp_path / "data", tiny_bert, db_url)
    with BackgroundCoordinator(config) as first:
        target = _target(first)
        assert _cut_half_way(first, target, expert) > 0
    staged = next(
        p
        for p in (tmp_path / "data" / "uploads").rglob("*")
        if p.is_file() and p.stat().st_size > 0
    )
    data = bytearray(staged.read_bytes())
    data[0] ^= 0xFF
    staged.write_bytes(bytes(data))
    with BackgroundCoordinator(config) as restarted:
        again = Target(address=restarted.address, token=target.token)
        with pytest.raises(grpc.RpcError) as err:
            upload_expert(again, expert, "restarted", "toy", progress=False)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "sha256 or size does not match" in err.value.details()
        assert restarted.state.registry.list_experts().items == ()


def test_bfloat16_weights_are_checked_for_inf_and_accepted_when_finite(
    coordinator: BackgroundCoordinator, expert: Path
) -> None:
    target = _target(coordinator)
    weights = load_file(str(expert / ADAPTER_WEIGHTS))
    half = {k: v.to(torch.bfloat16) for k, v in weights.items()}
    key = next(k for k in half if "lora_B" in k)
    half[key][-1, -1] = float("inf")
    save_file(half, str(expert / ADAPTER_WEIGHTS))
    with pytest.raises(grpc.RpcError) as err:
        upload_expert(target, expert, "half", "toy", progress=False)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"tensor {key!r} holds NaN or Inf" in err.value.details()
    half[key][-1, -1] = 0.5
    save_file(half, str(expert / ADAPTER_WEIGHTS))
    assert upload_expert(target, expert, "half", "toy", progress=False).created


def test_peft_default_heads_in_modules_to_save_are_accepted_and_other_modules_refused(
    coordinator: BackgroundCoordinator, expert: Path
) -> None:
    """PEFT 0.22 writes DistilBERT's ``pre_classifier`` beside ``classifier`` and ``score`` into
    every sequence-classification adapter's ``modules_to_save``; a BERT adapter saves no tensor
    for it. A module that is not a head is still refused."""
    target = _target(coordinator)
    rewrite_json(expert / ADAPTER_CONFIG, modules_to_save=["classifier", "score", "pre_classifier"])
    assert upload_expert(target, expert, "peft-0.22", "toy", progress=False).created
    rewrite_json(expert / ADAPTER_CONFIG, modules_to_save=["classifier", "pooler"])
    with pytest.raises(grpc.RpcError) as err:
        upload_expert(target, expert, "pooler", "toy", progress=False)
    assert "modules_to_save ['pooler'] not allowed" in err.value.details()


def _pickle_payload(path: Path) -> None:
    path.write_bytes(pickle.dumps({"evil": "payload"}))


def _nan(path: Path) -> None:
    tensors = load_file(str(path))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path))


def _wrong_shape(path: Path) -> None:
    tensors = load_file(str(path))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    save_file(tensors, str(path))


def _huge_declared_shape(path: Path) -> None:
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [1 << 30, 1 << 30], "data_offsets": [0, 16]}}
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _wrong_hidden(path: Path) -> None:
    tensors = load_file(str(path))
    tensors["embedding.mean"] = torch.zeros(7)
    save_file(tensors, str(path))


REFUSALS = {
    "pickle adapter": (ADAPTER_WEIGHTS, _pickle_payload, "not a safetensors file"),
    "nan weights": (ADAPTER_WEIGHTS, _nan, "NaN"),
    "wrong lora shape": (ADAPTER_WEIGHTS, _wrong_shape, "do not match"),
    "huge declared shape": (ADAPTER_WEIGHTS, _huge_declared_shape, "overflow"),
    "truncated": (ADAPTER_WEIGHTS, _truncate, "safetensors"),
    "unknown target": (
        ADAPTER_CONFIG,
        lambda p: rewrite_json(p, target_modules=["dense"]),
        "not allowed",
    ),
    "rank too high": (ADAPTER_CONFIG, lambda p: rewrite_json(p, r=1000), "r must be"),
    "statistics hidden size": (STATISTICS_TENSORS, _wrong_hidden, "embedding.mean"),
    "statistics meta": (STATISTICS_META, lambda p: rewrite_json(p, hidden_size=3), "hidden_size"),
    "statistics unknown field": (
        STATISTICS_META,
        lambda p: rewrite_json(p, raw_texts=["x"]),
        "unknown field",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_invalid_experts_are_refused_by_name_and_leave_nothing_behind(
    case: str, coordinator: BackgroundCoordinator, expert: Path
) -> None:
    target = _target(coordinator)
    file_name, corrupt, message = REFUSALS[case]
    corrupt(expert / file_name)
    before = snapshot(coordinator.state)
    with pytest.raises(grpc.RpcError) as err:
        upload_expert(target, expert, "bad", "toy", progress=False)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert file_name in err.value.details() and message in err.value.details(), err.value.details()
    after = snapshot(coordinator.state)
    assert after["blobs"] == before["blobs"]
    assert coordinator.state.registry.list_experts().items == ()
    staged = [p for p in (Path(coordinator.config.data_dir) / "uploads").rglob("*") if p.is_file()]
    assert staged == []


def test_an_upload_whose_validation_breaks_is_failed_and_its_staging_removed(
    coordinator: BackgroundCoordinator, expert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A defect in validation (once: RecursionError) must not leave the upload ``receiving``
    with its bytes held and every retry answered INTERNAL."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr("moerge.coordinator.uploads.receiver.validate_expert_dir", broken)
    target = _target(coordinator)
    with pytest.raises(grpc.RpcError):  # INTERNAL (the client's own retry: refused for good)
        upload_expert(target, expert, "broken", "toy", progress=False)
    registry = coordinator.state.registry
    (upload,) = [u for u in registry.stale_uploads(0) if u.manifest["expert_name"] == "broken"]
    assert upload.state == "failed" and "RecursionError" in upload.error
    staged = Path(coordinator.config.data_dir) / "uploads" / upload.contributor_id
    assert not list(staged.glob(f"{upload.upload_id}.*"))
    with pytest.raises(grpc.RpcError) as again:  # a retry is refused for good, not INTERNAL
        upload_expert(target, expert, "broken", "toy", progress=False)
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "validation failed (RecursionError)" in again.value.details()


def test_huge_but_finite_weights_are_refused(
    coordinator: BackgroundCoordinator, expert: Path
) -> None:
    """+-3e38 in a head is finite float32 but turned every ensemble it joined into NaN."""
    weights = load_file(str(expert / ADAPTER_WEIGHTS))
    key = next(k for k in weights if k.endswith("classifier.weight"))
    weights[key] = torch.full_like(weights[key], 3e38) * torch.sign(torch.randn_like(weights[key]))
    save_file(weights, str(expert / ADAPTER_WEIGHTS))
    with pytest.raises(grpc.RpcError) as err:
        upload_expert(_target(coordinator), expert, "huge", "toy", progress=False)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"tensor {key!r} holds a value of size 3e+38" in err.value.details()
    assert coordinator.state.registry.list_experts().items == ()


def test_a_json_integer_of_thousands_of_digits_is_refused_in_moerge_words(
    coordinator: BackgroundCoordinator, expert: Path
) -> None:
    path = expert / STATISTICS_META
    path.write_text(path.read_text().replace('"example_count": ', '"example_count": ' + "9" * 5000))
    with pytest.raises(grpc.RpcError) as err:
        upload_expert(_target(coordinator), expert, "digits", "toy", progress=False)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "too many digits" in err.value.details()
    assert "set_int_max_str_digits" not in err.value.details()


def test_a_lora_module_missing_its_b_factor_is_named(
    coordinator: BackgroundCoordinator, expert: Path
) -> None:
    weights = load_file(str(expert / ADAPTER_WEIGHTS))
    key = next(k for k in weights if "lora_B" in k)
    del weights[key]
    save_file(weights, str(expert / ADAPTER_WEIGHTS))
    with pytest.raises(grpc.RpcError) as err:
        upload_expert(_target(coordinator), expert, "missing", "toy", progress=False)
    assert "lacks lora_A or lora_B" in err.value.details()
