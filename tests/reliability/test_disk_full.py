"""A full disk under the staging area and blob store: a clear error, nothing lost, service goes on.

Two real ways to fill it: a 8 MiB tmpfs mounted as the data dir (needs root; skipped without),
and ``RLIMIT_FSIZE`` set in the coordinator process (any user), which makes a write past the
limit fail with EFBIG. The upload that hits it gets RESOURCE_EXHAUSTED naming disk space; the
registry and the blob store are unchanged; Predict keeps working; once there is room again (the
tmpfs grown, as an operator would) the next upload commits, all without a restart.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import upload_expert
from moerge.expert_format import ADAPTER_WEIGHTS
from moerge.storage.blobstore_local import LocalBlobStore
from moerge.storage.db import make_engine
from moerge.storage.registry import Registry
from tests.reliability.coordinator_process import CoordinatorProcess, file_size_limit

LIMIT = 8 << 20  # bytes the disk (or any one file) may hold
TOO_BIG = 12 << 20  # an upload larger than that


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}"
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


@pytest.fixture(params=["rlimit_fsize", "tmpfs"])
def full_disk(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_bert: Path
) -> Iterator[tuple[CoordinatorProcess, str]]:
    """A running coordinator whose data dir fills up at :data:`LIMIT` bytes."""
    data_dir = tmp_path / "data"
    db_url = f"sqlite:///{tmp_path / 'registry.db'}"  # the registry is not on the small disk
    coordinator = CoordinatorProcess(data_dir, tiny_bert, db_url=db_url, log_dir=tmp_path / "logs")
    if request.param == "tmpfs":
        if os.geteuid() != 0 or not _mount_tmpfs(data_dir, str(LIMIT)):
            pytest.skip("mounting a tmpfs needs root")
        try:
            yield coordinator.start(), request.param
        finally:
            coordinator.stop()
            subprocess.run(["umount", str(data_dir)], capture_output=True, check=False)
    else:
        try:
            yield coordinator.start(preexec_fn=file_size_limit(LIMIT)), request.param
        finally:
            coordinator.stop()


def _state(coordinator: CoordinatorProcess, db_url: str) -> tuple[object, ...]:
    blobs = LocalBlobStore(coordinator.data_dir / "blobs")
    registry = Registry(make_engine(db_url), blobs)
    experts = registry.list_experts(page_size=500).items
    digests = tuple(blobs.iter_blobs())
    assert all(blobs.verify(sha) for sha in digests)
    return tuple((e.id, e.content_sha256) for e in experts), digests


def test_a_full_disk_gives_resource_exhausted_and_the_service_goes_on(
    full_disk: tuple[CoordinatorProcess, str], expert_pool: list[Path], tmp_path: Path
) -> None:
    coordinator, mechanism = full_disk
    db_url = coordinator.env["MOERGE_DB_URL"]
    target = Target(address=coordinator.address, token=coordinator.enroll("filler"))
    upload_expert(target, expert_pool[0], "first", "task0", progress=False)
    assert coordinator.predict().predictions[0].output
    before = _state(coordinator, db_url)

    huge = tmp_path / "huge"
    shutil.copytree(expert_pool[1], huge)
    (huge / ADAPTER_WEIGHTS).write_bytes(os.urandom(TOO_BIG))
    with pytest.raises(grpc.RpcError) as refused:
        upload_expert(target, huge, "huge", "task1", progress=False)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    assert "disk space" in refused.value.details()

    assert coordinator.process is not None and coordinator.process.poll() is None
    assert coordinator.predict().predictions[0].output  # reads still work on a full disk
    assert _state(coordinator, db_url) == before  # nothing corrupted, nothing half-registered

    if mechanism == "tmpfs":  # the operator makes room; no restart
        remount = ["mount", "-o", f"remount,size={4 * LIMIT}", str(coordinator.data_dir)]
        subprocess.run(remount, check=True, capture_output=True)
    second = upload_expert(target, expert_pool[2], "second", "task2", progress=False)
    assert second.created
    assert coordinator.predict().predictions[0].output
    assert "Traceback" not in coordinator.log_text()
