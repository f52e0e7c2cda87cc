"""The default blob store: files under one folder on the coordinator's file system.

A blob lives at ``<root>/sha256/ab/cdef...`` (its digest, the first two hex characters as a
folder). Writes go to a temp file under ``<root>/tmp/``, are fsynced and then renamed into
place, and the renames are made durable, so a crash or a full disk never leaves a partial blob
visible. The contract (content addressing, verification on read, gc) is
:class:`~moerge.storage.blobstore.BlobStore`'s.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from moerge.storage.blobstore import (
    CHUNK,
    TEMP_PREFIX,
    TEMP_SUFFIX,
    BlobCorrupted,
    BlobMismatch,
    BlobNotFound,
    BlobRef,
    BlobStore,
    check_sha256,
)

_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_REST_RE = re.compile(r"[0-9a-f]{62}")


def _fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBlobStore(BlobStore):
    """Blobs under one root folder, named by their SHA-256."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._blob_dir = self.root / "sha256"
        self.temp_dir = self.root / "tmp"
        self._blob_dir.mkdir(parents=True, exist_ok=True)
        self.temp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """Where the blob lives (whether or not it exists)."""
        check_sha256(sha256)
        return self._blob_dir / sha256[:2] / sha256[2:]

    def size(self, sha256: str) -> int | None:
        """The blob file's size, or None when no file has this digest."""
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def _open_raw(self, sha256: str) -> IO[bytes]:
        try:
            return io.FileIO(self.path(sha256), "rb")
        except FileNotFoundError:
            raise BlobNotFound(sha256) from None

    def fetch(self, sha256: str, destination: str | os.PathLike[str]) -> Path:
        """Verify the blob, then hard-link it to ``destination`` (a copy across file systems)."""
        destination = Path(destination)
        if not self.verify(sha256):
            raise BlobCorrupted(sha256)
        temp = destination.with_name(destination.name + TEMP_SUFFIX)
        temp.unlink(missing_ok=True)
        try:
            os.link(self.path(sha256), temp)
        except OSError:
            shutil.copyfile(self.path(sha256), temp)
        os.replace(temp, destination)
        return destination

    def adopt(self, path: str | os.PathLike[str], sha256: str, size: int) -> BlobRef:
        """Store a file by hard-linking it into place: no copy, no re-read.

        Use it only for a file private to this process whose digest was computed over the very
        bytes written to it (the coordinator's upload staging). The size is checked, the file
        fsynced, then linked under a temp name and renamed into place like any write, so a blob
        is still visible only complete. ``path`` keeps its link. On another filesystem it falls
        back to a copy that verifies the digest.
        """
        check_sha256(sha256)
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != size:
                raise BlobMismatch(f"{path} has {os.fstat(fd).st_size} bytes, expected {size}")
            os.fsync(fd)
        finally:
            os.close(fd)
        temp = self.temp_dir / f"{TEMP_PREFIX}{secrets.token_hex(16)}{TEMP_SUFFIX}"
        try:
            os.link(path, temp)
        except OSError:  # another filesystem, or no hard links there
            with open(path, "rb") as source, self.writer(sha256, size) as writer:
                while chunk := source.read(CHUNK):
                    writer.write(chunk)
            assert writer.ref is not None
            return writer.ref
        try:
            os.utime(temp)  # a fresh mtime, so gc(min_age_seconds) spares it until referenced
            self._install(temp, BlobRef(sha256, size))
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return BlobRef(sha256, size)

    def delete(self, sha256: str) -> int:
        """Unlink the blob file and fsync its folder so the removal survives a crash; the bytes
        freed (0 if it was not there)."""
        path = self.path(sha256)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        _fsync_dir(path.parent)
        return size

    def _list(self) -> Iterator[tuple[str, float]]:
        for shard in sorted(self._blob_dir.iterdir()):
            if not (shard.is_dir() and _SHARD_RE.fullmatch(shard.name)):
                continue
            for blob in sorted(shard.iterdir()):
                if not _REST_RE.fullmatch(blob.name):
                    continue
                try:
                    status = blob.stat()
                except FileNotFoundError:  # removed meanwhile
                    continue
                if blob.is_file():
                    yield shard.name + blob.name, status.st_mtime

    def cleanup_temp(self, older_than_seconds: float = 0.0) -> int:
        """Remove temp files left by interrupted writes; returns how many.

        Call it at start, before any write begins, or with an age margin while running.
        """
        cutoff = time.time() - older_than_seconds
        removed = 0
        for entry in self.temp_dir.iterdir():
            if not (entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(TEMP_SUFFIX)):
                continue
            try:
                if older_than_seconds > 0 and entry.stat().st_mtime > cutoff:
                    continue
                entry.unlink()
            except FileNotFoundError:
                continue
            removed += 1
        return removed

    def _install(self, temp_path: Path, ref: BlobRef) -> None:
        """Rename a complete, fsynced temp file into place and make the rename durable."""
        destination = self.path(ref.sha256)
        shard = destination.parent
        if not shard.is_dir():
            shard.mkdir(exist_ok=True)
            _fsync_dir(self._blob_dir)
        os.replace(temp_path, destination)
        _fsync_dir(shard)
