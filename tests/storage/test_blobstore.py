"""The content-addressed blob store: one suite over both back ends (local files, S3).

Every test taking ``store`` runs twice: on :class:`LocalBlobStore` and on :class:`S3BlobStore`
against a real S3 API server (moto's, in its own process: ``tests/s3server.py`` says why not
MinIO). Tests taking ``local`` are about the file system back end alone (hard links, crashes of
a writer process), ``s3`` ones about S3 alone (unfinished multipart uploads).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from moerge.storage import blobstore
from moerge.storage.blobstore import (
    BlobCorrupted,
    BlobMismatch,
    BlobNotFound,
    BlobRef,
    BlobStore,
    GcResult,
    open_blob_store,
)
from moerge.storage.blobstore_local import LocalBlobStore
from moerge.storage.blobstore_s3 import S3BlobStore
from tests.s3server import REGION, S3Server


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def visible_blobs(store: BlobStore) -> list[str]:
    return list(store.iter_blobs())


def temp_files(store: BlobStore) -> list[Path]:
    return sorted(store.temp_dir.iterdir())


def overwrite(store: BlobStore, sha256: str, data: bytes) -> None:
    """Change a stored blob's bytes behind the store's back (bit rot, a bad disk, an operator)."""
    if isinstance(store, LocalBlobStore):
        store.path(sha256).write_bytes(data)
    else:
        assert isinstance(store, S3BlobStore)
        store.client.put_object(Bucket=store.bucket, Key=store.key(sha256), Body=data)


@pytest.fixture
def local(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


@pytest.fixture
def s3(s3_server: S3Server, tmp_path: Path) -> S3BlobStore:
    url = f"s3://{s3_server.new_bucket()}/some/prefix"
    store = open_blob_store(
        url, tmp_path / "unused", tmp_path / "s3-tmp", s3_server.endpoint_url, REGION
    )
    assert isinstance(store, S3BlobStore)
    return store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> BlobStore:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def test_put_bytes_round_trips_under_its_digest(store: BlobStore) -> None:
    data = b"adapter weights"
    ref = store.put_bytes(data)
    digest = sha(data)
    assert ref == BlobRef(digest, len(data))
    assert store.exists(digest)
    assert store.size(digest) == len(data)
    assert store.read_bytes(digest) == data
    assert store.verify(digest)
    assert visible_blobs(store) == [digest]
    assert temp_files(store) == []


def test_put_file_streams_a_large_file(store: BlobStore, tmp_path: Path) -> None:
    source = tmp_path / "adapter.safetensors"
    data = os.urandom(3 * (1 << 20) + 17)
    source.write_bytes(data)
    ref = store.put_file(source)
    assert ref == BlobRef(sha(data), len(data))
    with store.open(ref.sha256) as blob:
        assert blob.read(10) == data[:10]
        assert blob.read() == data[10:]


def test_the_same_content_is_stored_once(store: BlobStore) -> None:
    first = store.put_bytes(b"same")
    second = store.put_bytes(b"same")
    assert first == second
    assert visible_blobs(store) == [first.sha256]


def test_an_empty_blob_is_a_valid_blob(store: BlobStore) -> None:
    ref = store.put_bytes(b"")
    assert ref.size == 0
    assert store.read_bytes(ref.sha256) == b""


def test_a_flipped_byte_is_detected_on_read(store: BlobStore) -> None:
    ref = store.put_bytes(b"x" * 5000)
    corrupted = bytearray(b"x" * 5000)
    corrupted[2500] ^= 0x01
    overwrite(store, ref.sha256, bytes(corrupted))

    with pytest.raises(BlobCorrupted, match=ref.sha256) as raised:
        store.read_bytes(ref.sha256)
    assert raised.value.sha256 == ref.sha256
    with pytest.raises(BlobCorrupted), store.open(ref.sha256) as blob:
        while blob.read(1024):
            pass
    assert not store.verify(ref.sha256)


def test_writing_the_content_again_repairs_a_corrupted_blob(store: BlobStore) -> None:
    ref = store.put_bytes(b"precious")
    overwrite(store, ref.sha256, b"garbage!")
    store.put_bytes(b"precious")
    assert store.read_bytes(ref.sha256) == b"precious"


def test_a_missing_blob_raises_blob_not_found(store: BlobStore) -> None:
    missing = sha(b"never stored")
    assert not store.exists(missing)
    assert store.size(missing) is None
    with pytest.raises(BlobNotFound, match=missing):
        store.read_bytes(missing)
    with pytest.raises(FileNotFoundError):
        store.verify(missing)


@pytest.mark.parametrize(
    "bad_sha",
    [
        "../" * 10 + "etc/passwd",
        "/etc/passwd",
        "A" * 64,
        "a" * 63,
        "a" * 65,
        "a" * 62 + "/x",
        "a" * 62 + "..",
        "",
        None,
    ],
)
def test_digests_that_are_not_64_lowercase_hex_are_refused(store: BlobStore, bad_sha: Any) -> None:
    for call in (store.exists, store.size, store.read_bytes, store.delete):
        with pytest.raises(ValueError, match="sha256"):
            call(bad_sha)


def test_writer_commits_only_on_clean_exit(store: BlobStore) -> None:
    with store.writer() as writer:
        writer.write(b"part one, ")
        writer.write(b"part two")
        assert visible_blobs(store) == []
        assert len(temp_files(store)) == 1
    assert writer.ref == BlobRef(sha(b"part one, part two"), 18)
    assert store.read_bytes(writer.ref.sha256) == b"part one, part two"

    with pytest.raises(RuntimeError, match="stream broke"), store.writer() as writer:
        writer.write(b"half of something")
        raise RuntimeError("stream broke")
    assert writer.ref is None
    assert visible_blobs(store) == [sha(b"part one, part two")]
    assert temp_files(store) == []


def test_writer_refuses_to_commit_an_unexpected_digest(store: BlobStore) -> None:
    with (
        pytest.raises(BlobMismatch, match="sha256"),
        store.writer(expected_sha256=sha(b"expected")) as writer,
    ):
        writer.write(b"something else")
    assert visible_blobs(store) == []
    assert temp_files(store) == []


def test_writer_refuses_more_or_fewer_bytes_than_expected(store: BlobStore) -> None:
    with pytest.raises(BlobMismatch, match="larger"), store.writer(expected_size=4) as writer:
        writer.write(b"12345")
    with pytest.raises(BlobMismatch, match="expected 4"), store.writer(expected_size=4) as writer:
        writer.write(b"123")
    assert visible_blobs(store) == []
    assert temp_files(store) == []

    with store.writer(expected_sha256=sha(b"1234"), expected_size=4) as writer:
        writer.write(b"1234")
    assert writer.ref == BlobRef(sha(b"1234"), 4)


def test_a_full_disk_during_a_write_leaves_nothing_visible(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", disk_full)
        with pytest.raises(OSError) as raised:
            store.put_bytes(b"does not fit")
    assert raised.value.errno == errno.ENOSPC
    assert visible_blobs(store) == []
    assert temp_files(store) == []


def test_a_failing_fsync_leaves_nothing_visible(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def io_error(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", io_error)
        with pytest.raises(OSError, match=os.strerror(errno.EIO)):
            store.put_bytes(b"never durable")
    assert visible_blobs(store) == []
    assert temp_files(store) == []


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from moerge.storage.blobstore_local import LocalBlobStore

    store = LocalBlobStore(sys.argv[1])
    with store.writer() as writer:
        writer.write(b"a" * 1_000_000)
        print("half written", flush=True)
        time.sleep(60)
        writer.write(b"b" * 1_000_000)
    """
)


def test_a_writer_killed_half_way_leaves_only_a_temp_file_that_cleanup_removes(
    local: LocalBlobStore,
) -> None:
    store = local
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, str(store.root)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "half written"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        if child.stdout is not None:
            child.stdout.close()

    assert visible_blobs(store) == []
    leftovers = temp_files(store)
    assert len(leftovers) == 1
    assert leftovers[0].stat().st_size == 1_000_000
    assert store.cleanup_temp() == 1
    assert temp_files(store) == []


def test_cleanup_temp_spares_recent_temp_files_when_given_an_age(store: BlobStore) -> None:
    old = store.temp_dir / "blob-old.tmp"
    new = store.temp_dir / "blob-new.tmp"
    old.write_bytes(b"old")
    new.write_bytes(b"new")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert store.cleanup_temp(older_than_seconds=600) == 1
    assert temp_files(store) == [new]


def test_gc_keeps_referenced_blobs_and_removes_the_rest(store: BlobStore) -> None:
    kept = store.put_bytes(b"kept")
    dropped = store.put_bytes(b"dropped")
    result = store.gc({kept.sha256})
    assert result == GcResult(removed=1, bytes_freed=dropped.size, digests=(dropped.sha256,))
    assert visible_blobs(store) == [kept.sha256]


def test_gc_spares_blobs_younger_than_min_age(store: BlobStore) -> None:
    kept = store.put_bytes(b"referenced")
    young = store.put_bytes(b"upload in progress")
    assert store.gc({kept.sha256}, min_age_seconds=600).removed == 0
    assert visible_blobs(store) == sorted([kept.sha256, young.sha256])


def test_gc_removes_orphans_once_older_than_min_age(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = store.put_bytes(b"referenced")
    orphan = store.put_bytes(b"left by a fit that was killed")
    an_hour_later = time.time() + 3600
    monkeypatch.setattr(blobstore.time, "time", lambda: an_hour_later)
    result = store.gc({kept.sha256}, min_age_seconds=600)
    assert result == GcResult(1, orphan.size, (orphan.sha256,))
    assert visible_blobs(store) == [kept.sha256]


def test_gc_of_the_local_store_goes_by_each_file_mtime(local: LocalBlobStore) -> None:
    store = local
    old = store.put_bytes(b"old orphan")
    young = store.put_bytes(b"upload in progress")
    an_hour_ago = time.time() - 3600
    os.utime(store.path(old.sha256), (an_hour_ago, an_hour_ago))
    result = store.gc(set(), min_age_seconds=600)
    assert result.digests == (old.sha256,)
    assert visible_blobs(store) == [young.sha256]


def test_delete_returns_the_bytes_freed(store: BlobStore) -> None:
    ref = store.put_bytes(b"12345")
    assert store.delete(ref.sha256) == 5
    assert store.delete(ref.sha256) == 0
    assert not store.exists(ref.sha256)


def test_the_local_store_lays_blobs_out_by_digest(local: LocalBlobStore) -> None:
    ref = local.put_bytes(b"adapter weights")
    assert local.path(ref.sha256) == local.root / "sha256" / ref.sha256[:2] / ref.sha256[2:]
    with pytest.raises(ValueError, match="sha256"):
        local.path("../" * 10 + "etc/passwd")


def test_iter_blobs_ignores_stray_files(local: LocalBlobStore) -> None:
    store = local
    ref = store.put_bytes(b"real")
    (store.root / "sha256" / "zz").mkdir()
    (store.root / "sha256" / ref.sha256[:2] / "notes.txt").write_text("stray")
    assert visible_blobs(store) == [ref.sha256]


def test_adopt_links_a_private_file_into_place_without_copying(
    local: LocalBlobStore, tmp_path: Path
) -> None:
    store = local
    staged = tmp_path / "staged.bin"
    staged.write_bytes(b"weights streamed in" * 1000)
    digest = sha(staged.read_bytes())
    old = time.time() - 3600
    os.utime(staged, (old, old))  # staged long ago, e.g. an upload resumed the next day
    ref = store.adopt(staged, digest, staged.stat().st_size)
    assert ref == BlobRef(digest, staged.stat().st_size)
    assert os.path.samefile(store.path(digest), staged)  # a hard link, not a copy
    assert store.verify(digest)
    assert temp_files(store) == []
    # a fresh mtime: a sweep with an age margin spares it until the registry references it
    assert store.gc(referenced=[], min_age_seconds=60).removed == 0


def test_adopt_refuses_a_size_that_does_not_match_and_stores_nothing(
    store: BlobStore, tmp_path: Path
) -> None:
    staged = tmp_path / "staged.bin"
    staged.write_bytes(b"short")
    with pytest.raises(BlobMismatch):
        store.adopt(staged, sha(b"short"), 6)
    assert visible_blobs(store) == [] and temp_files(store) == []


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second filesystem")
def test_adopt_from_another_filesystem_copies_and_verifies_the_digest(
    local: LocalBlobStore,
) -> None:
    store = local
    with tempfile_on_shm() as staged:
        staged.write_bytes(b"on tmpfs")
        if os.stat(staged).st_dev == os.stat(store.root).st_dev:
            pytest.skip("/dev/shm is on the store's filesystem here")
        with pytest.raises(BlobMismatch):
            store.adopt(staged, sha(b"something else"), staged.stat().st_size)
        assert visible_blobs(store) == [] and temp_files(store) == []
        ref = store.adopt(staged, sha(b"on tmpfs"), staged.stat().st_size)
        assert store.read_bytes(ref.sha256) == b"on tmpfs"
        assert not os.path.samefile(store.path(ref.sha256), staged)


def test_adopt_stores_a_staged_file_under_the_given_digest(
    store: BlobStore, tmp_path: Path
) -> None:
    staged = tmp_path / "staged.bin"
    staged.write_bytes(b"weights streamed in" * 1000)
    digest = sha(staged.read_bytes())
    assert store.adopt(staged, digest, staged.stat().st_size) == BlobRef(digest, 19000)
    assert store.verify(digest) and staged.exists()


def test_fetch_writes_a_verified_local_copy_and_nothing_for_a_corrupted_blob(
    store: BlobStore, tmp_path: Path
) -> None:
    ref = store.put_bytes(b"statistics" * 100)
    assert store.fetch(ref.sha256, tmp_path / "copy").read_bytes() == b"statistics" * 100
    overwrite(store, ref.sha256, b"statistics" * 99 + b"STATISTICS")
    with pytest.raises((BlobCorrupted, OSError)):
        store.fetch(ref.sha256, tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("bad", "copy"))) == [
        "copy"
    ]


def test_a_large_blob_goes_up_in_parts_and_comes_back_whole(
    store: BlobStore, tmp_path: Path
) -> None:
    data = os.urandom(20 << 20)  # above the S3 back end's 8 MiB multipart threshold
    source = tmp_path / "adapter.safetensors"
    source.write_bytes(data)
    ref = store.put_file(source)
    assert store.size(ref.sha256) == len(data)
    assert store.read_bytes(ref.sha256) == data


def test_stale_multipart_uploads_are_aborted(s3: S3BlobStore) -> None:
    # moto reports every multipart upload as started in 2010, so the margin is not tested here
    started = s3.client.create_multipart_upload(Bucket=s3.bucket, Key=s3.prefix + "uploads/x")
    assert s3.abort_stale_multipart(older_than_seconds=0, under="sha256/") == 0
    assert s3.abort_stale_multipart(older_than_seconds=0) == 1
    listing = s3.client.list_multipart_uploads(Bucket=s3.bucket)
    assert started["UploadId"] not in [u["UploadId"] for u in listing.get("Uploads", ())]


def test_an_unknown_blob_store_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="s3://"):
        open_blob_store("ftp://host/x", tmp_path, tmp_path)


@contextmanager
def tempfile_on_shm() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        yield folder / "staged.bin"
    finally:
        shutil.rmtree(folder)
