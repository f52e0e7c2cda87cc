"""SIGKILL the coordinator while an expert streams over the bulk data channel; restart; resume.

The real client (``upload_expert``, ``transport="bulk"``) streams through
:class:`~tests.reliability.proxy.DataChannelProxy`, which the coordinator advertises: it cuts
the first connection partway (so some bytes reach the disk), then trickles the resumed one so
that the SIGKILL lands mid-stream. After a restart on the same data dir and database: the
coordinator's offset is exactly what reached the disk (bytes the dead process had read into
memory are not counted), the staged bytes are the file's own, the acknowledged expert is intact,
nothing half-written is in the registry or the blob store, and the client resumes from that
offset with a fresh ticket, sends only the rest over the data channel and commits.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import (
    LocalFile,
    describe_files,
    make_manifest,
    upload_expert,
)
from moerge.storage.blobstore_local import LocalBlobStore
from moerge.storage.db import make_engine
from moerge.storage.registry import Registry
from moerge.v1 import contributor_pb2, contributor_pb2_grpc
from tests.reliability.coordinator_process import CoordinatorProcess
from tests.reliability.proxy import DataChannelProxy

SLOW_RATE = 8_000.0  # bytes/s for the connection the kill interrupts (tens of KB left to send)
KILL_AFTER = 2048  # payload bytes of that connection forwarded before the SIGKILL


def _status(address: str, target: Target, upload_id: str) -> contributor_pb2.UploadStatus:
    with grpc.insecure_channel(address) as channel:
        return contributor_pb2_grpc.ContributorServiceStub(channel).GetUploadStatus(
            contributor_pb2.GetUploadStatusRequest(upload_id=upload_id),
            metadata=target.metadata(),
            timeout=30,
        )


def _staged_bytes(data_dir: Path, upload_id: str, files: list[LocalFile]) -> bytes:
    """What the staging folder holds, in stream order (files are filled one after another)."""
    (folder,) = (data_dir / "uploads").rglob(f"{upload_id}.d")
    return b"".join((folder / f.name).read_bytes() for f in files if (folder / f.name).exists())


def test_sigkill_mid_bulk_transfer_resumes_from_what_reached_disk_with_a_fresh_ticket(
    tmp_path: Path, tiny_bert: Path, expert_pool: list[Path], db_url: str
) -> None:
    data_dir = tmp_path / "data"
    proxy = DataChannelProxy()
    coordinator = CoordinatorProcess(
        data_dir, tiny_bert, db_url=db_url, bulk_advertise=proxy.address
    )
    coordinator.start()
    try:
        proxy.point_at(coordinator.bulk_address)
        # Before the fault: one expert acknowledged, sent over the data channel.
        alice = Target(address=coordinator.address, token=coordinator.enroll("alice"))
        kept_folder = expert_pool[0]
        kept = upload_expert(
            alice, kept_folder, "kept", kept_folder.name, progress=False, transport="bulk"
        )
        assert kept.created and len(proxy.requests) == 1

        # The fault: bob's upload is cut once (resumed with a new ticket), then killed mid-stream.
        folder = expert_pool[1]
        files = describe_files(folder)
        payload = b"".join(f.path.read_bytes() for f in files)
        total = len(payload)
        upload_id = make_manifest(files, "cut", folder.name, "").upload_id
        bob = Target(address=coordinator.address, token=coordinator.enroll("bob"))
        proxy.cut_after, proxy.rate = total // 3, SLOW_RATE
        outcome: dict[str, object] = {}

        def run() -> None:
            try:
                outcome["response"] = upload_expert(
                    bob,
                    folder,
                    "cut",
                    folder.name,
                    progress=False,
                    transport="bulk",
                    max_attempts=3,
                )
            except grpc.RpcError as exc:
                outcome["error"] = exc.code()

        client = threading.Thread(target=run)
        client.start()
        deadline = time.monotonic() + 15
        while len(proxy.forwarded) < 3 or proxy.forwarded[2] < KILL_AFTER:
            assert time.monotonic() < deadline and client.is_alive(), (proxy.requests, outcome)
            time.sleep(0.01)
        coordinator.kill()
        client.join(30)
        assert "response" not in outcome  # never acknowledged: it failed, and cleanly
        assert outcome["error"] == grpc.StatusCode.UNAVAILABLE
        cut, interrupted = proxy.requests[1], proxy.requests[2]
        assert (cut.offset, cut.count) == (0, total)
        assert 0 < interrupted.offset < total // 3 + 1  # the coordinator's offset after the cut
        sent_before_kill = interrupted.offset + proxy.forwarded[2]
        assert sent_before_kill < total  # the kill came mid-stream

        # What reached the disk: the file's own bytes, no more than were sent, none granted lost.
        staged = _staged_bytes(data_dir, upload_id, files)
        assert interrupted.offset <= len(staged) <= sent_before_kill
        assert staged == payload[: len(staged)]

        # After the restart (new gRPC and data-channel ports, the same data dir and database).
        coordinator.start()
        proxy.point_at(coordinator.bulk_address)
        proxy.rate = None
        status = _status(coordinator.address, bob, upload_id)
        assert status.state == "receiving" and status.received_bytes == len(staged)
        blobs = LocalBlobStore(data_dir / "blobs")
        engine = make_engine(db_url)
        registry = Registry(engine, blobs)
        (listed,) = registry.list_experts(page_size=50).items  # only the acknowledged expert
        assert listed.id == kept.expert.expert_id
        want = {f.name: f.sha256 for f in describe_files(kept_folder)}
        assert {name: ref.sha256 for name, ref in listed.files.items()} == want
        assert all(blobs.verify(sha) for sha in blobs.iter_blobs())  # no partial blob
        assert list((data_dir / "blobs" / "tmp").iterdir()) == []
        only_interrupted = {f.sha256 for f in files} - set(want.values())
        assert only_interrupted and not only_interrupted & set(blobs.iter_blobs())

        # The client resumes from that offset with a fresh ticket and sends only the rest.
        resumed = upload_expert(
            Target(address=coordinator.address, token=bob.token),
            folder,
            "cut",
            folder.name,
            progress=False,
            transport="bulk",
            max_attempts=1,
        )
        assert resumed.created
        last = proxy.requests[-1]
        assert len(proxy.requests) == 4
        assert (last.offset, last.count) == (len(staged), total - len(staged))
        assert proxy.forwarded[-1] == total - len(staged)
        assert last.ticket not in {r.ticket for r in proxy.requests[:-1]}
        expert = registry.get_expert(resumed.expert.expert_id)
        assert {name: ref.sha256 for name, ref in expert.files.items()} == {
            f.name: f.sha256 for f in files
        }
        assert all(blobs.verify(ref.sha256) for ref in expert.files.values())
        assert len(registry.list_experts(page_size=50).items) == 2
        assert [p for p in (data_dir / "uploads").rglob("*") if p.is_file()] == []
        print(  # pytest -s shows the figures
            f"total={total} cut_at={interrupted.offset} sent_before_kill={sent_before_kill} "
            f"on_disk={len(staged)} resumed_from={last.offset} resent={proxy.forwarded[-1]}"
        )
        engine.dispose()
    finally:
        coordinator.stop()
        proxy.close()
