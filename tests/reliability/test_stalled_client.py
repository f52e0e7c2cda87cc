"""A client that stops sending mid-upload: its deadline ends the call, the coordinator lets go.

The stalled stream holds a manifest and two chunks, then nothing. After the client's 1 s
deadline the coordinator must have finished the RPC (its own metrics count it), hold no file of
the upload open, keep the two chunks, and serve the same upload to completion when the client
comes back, from the coordinator's offset.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import describe_files, make_manifest, upload_expert
from moerge.v1 import contributor_pb2, contributor_pb2_grpc
from tests.reliability.coordinator_process import CoordinatorProcess, free_port
from tests.reliability.proxy import ThrottlingProxy

CHUNK = 4096
UPLOAD = "/moerge.v1.ContributorService/UploadExpert"


def _stalling_stream(
    manifest: contributor_pb2.UploadManifest, data: bytes, chunks: int, release: threading.Event
) -> Iterator[contributor_pb2.UploadExpertRequest]:
    yield contributor_pb2.UploadExpertRequest(manifest=manifest)
    for i in range(chunks):
        piece = data[i * CHUNK : (i + 1) * CHUNK]
        yield contributor_pb2.UploadExpertRequest(
            chunk=contributor_pb2.UploadChunk(offset=i * CHUNK, data=piece)
        )
    release.wait(60)  # the stall: no more messages, no end of stream


def _upload_calls(metrics: str, code: str) -> int:
    return sum(
        int(found.value)
        for family in text_string_to_metric_families(metrics)
        for found in family.samples
        if found.name == "moerge_grpc_requests_total"
        and found.labels == {"method": UPLOAD, "code": code}
    )


def _open_upload_files(pid: int, data_dir: Path) -> list[str]:
    uploads = str((data_dir / "uploads").resolve())
    paths = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return [p for p in paths if p.startswith(uploads)]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_stalled_upload_times_out_frees_the_server_and_resumes_later(
    tmp_path: Path, tiny_bert: Path, expert_pool: list[Path]
) -> None:
    metrics_port = free_port()
    with CoordinatorProcess(
        tmp_path / "data", tiny_bert, metrics_listen=f"127.0.0.1:{metrics_port}"
    ) as coordinator:
        target = Target(address=coordinator.address, token=coordinator.enroll("staller"))
        folder = expert_pool[0]
        files = describe_files(folder)
        manifest = make_manifest(files, "stalled", "task0", "")
        data = b"".join(f.path.read_bytes() for f in files)
        release = threading.Event()
        started = time.monotonic()
        with grpc.insecure_channel(coordinator.address) as channel:
            stub = contributor_pb2_grpc.ContributorServiceStub(channel)
            with pytest.raises(grpc.RpcError) as stalled:
                stub.UploadExpert(
                    _stalling_stream(manifest, data, 2, release),
                    metadata=target.metadata(),
                    timeout=1.0,
                )
            release.set()
            assert stalled.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 10

            status = stub.GetUploadStatus(
                contributor_pb2.GetUploadStatusRequest(upload_id=manifest.upload_id),
                metadata=target.metadata(),
                timeout=30,
            )
        assert (status.state, status.received_bytes) == ("receiving", 2 * CHUNK)

        url = f"http://127.0.0.1:{metrics_port}/metrics"
        deadline = time.monotonic() + 10
        while True:  # the server side of the call has ended, not merely the client's
            with urllib.request.urlopen(url, timeout=10) as response:
                metrics = response.read().decode()
            ended = sum(_upload_calls(metrics, c) for c in ("CANCELLED", "DEADLINE_EXCEEDED"))
            if ended or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert ended == 1, [line for line in metrics.splitlines() if "UploadExpert" in line]
        assert _open_upload_files(coordinator.pid, coordinator.data_dir) == []

        with ThrottlingProxy(coordinator.address) as counter:
            done = upload_expert(
                Target(address=counter.address, token=target.token),
                folder,
                "stalled",
                "task0",
                chunk_size=CHUNK,
                progress=False,
            )
        assert done.created
        assert counter.client_bytes < len(data) - 2 * CHUNK + 4096  # only the rest was sent
