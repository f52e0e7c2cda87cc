"""Content-addressed file store for expert files and router artifacts.

A blob lives at ``<root>/sha256/ab/cdef...`` (its digest, the first two hex characters as a
folder). Writes go to a temp file under ``<root>/tmp/``, are fsynced and then renamed into
place, so a crash or a full disk never leaves a partial blob visible: a blob either exists
with its full content or not at all. Reads verify the digest, so silent corruption on disk is
reported instead of served.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_REST_RE = re.compile(r"[0-9a-f]{62}")
_CHUNK = 1 << 20
_TEMP_PREFIX = "blob-"
_TEMP_SUFFIX = ".tmp"


class BlobRef(NamedTuple):
    """A blob's identity and size; a plain ``(sha256, size)`` tuple works wherever one is asked."""

    sha256: str
    size: int


@dataclass(frozen=True)
class GcResult:
    """What a garbage collection removed: how many blobs, how many bytes, and which."""

    removed: int
    bytes_freed: int
    digests: tuple[str, ...] = ()


class BlobCorrupted(Exception):
    """A stored blob's content no longer matches its digest."""

    def __init__(self, sha256: str) -> None:
        super().__init__(f"blob {sha256} is corrupted: its content does not match its digest")
        self.sha256 = sha256


class BlobNotFound(FileNotFoundError):
    """No blob with this digest is stored."""

    def __init__(self, sha256: str) -> None:
        super().__init__(f"blob {sha256} is not in the blob store")
        self.sha256 = sha256


class BlobMismatch(ValueError):
    """A streamed write did not match the announced digest or size; nothing was stored."""


def check_sha256(sha256: object) -> str:
    """Refuse anything but 64 lowercase hex characters before it becomes part of a path."""
    if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
        raise ValueError(f"not a sha256 digest (64 lowercase hex characters): {sha256!r:.80}")
    return sha256


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobWriter:
    """One streaming write into the store; obtained from :meth:`BlobStore.writer`."""

    def __init__(
        self,
        fd: int,
        temp_path: Path,
        expected_sha256: str | None,
        expected_size: int | None,
    ) -> None:
        self._fd: int | None = fd
        self._temp_path = temp_path
        self._expected_sha256 = expected_sha256
        self._expected_size = expected_size
        self._hash = hashlib.sha256()
        self._size = 0
        self.ref: BlobRef | None = None

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._size

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``; refuses to grow past ``expected_size`` so uploads stay bounded."""
        if self._fd is None:
            raise ValueError("write to a closed blob writer")
        if self._expected_size is not None and self._size + len(data) > self._expected_size:
            raise BlobMismatch(f"blob is larger than the expected {self._expected_size} bytes")
        _write_all(self._fd, data)
        self._hash.update(data)
        self._size += len(data)
        return len(data)

    def _commit(self, store: BlobStore) -> BlobRef:
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        sha256 = self._hash.hexdigest()
        if self._expected_size is not None and self._size != self._expected_size:
            raise BlobMismatch(f"blob has {self._size} bytes, expected {self._expected_size}")
        if self._expected_sha256 is not None and sha256 != self._expected_sha256:
            raise BlobMismatch(f"blob has sha256 {sha256}, expected {self._expected_sha256}")
        store._install(self._temp_path, sha256)
        self.ref = BlobRef(sha256, self._size)
        return self.ref

    def _abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._temp_path.unlink(missing_ok=True)


class _VerifyingReader(io.RawIOBase):
    """Reads a blob and checks its digest when the end is reached."""

    def __init__(self, sha256: str, file: io.FileIO) -> None:
        super().__init__()
        self._file = file
        self._sha256 = sha256
        self._hash = hashlib.sha256()
        self._verified = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        if len(buffer) == 0:
            return 0
        count = self._file.readinto(buffer)
        if count:
            self._hash.update(memoryview(buffer)[:count])
        elif not self._verified:
            if self._hash.hexdigest() != self._sha256:
                raise BlobCorrupted(self._sha256)
            self._verified = True
        return count or 0

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class BlobStore:
    """Blobs under one root folder, named by their SHA-256."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._blob_dir = self.root / "sha256"
        self._temp_dir = self.root / "tmp"
        self._blob_dir.mkdir(parents=True, exist_ok=True)
        self._temp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """Where the blob lives (whether or not it exists)."""
        check_sha256(sha256)
        return self._blob_dir / sha256[:2] / sha256[2:]

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int | None:
        """Size in bytes, or None if the blob is not stored."""
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    @contextmanager
    def writer(
        self,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
    ) -> Iterator[BlobWriter]:
        """Stream a blob in: ``with store.writer() as w: w.write(chunk)``, then ``w.ref``.

        The blob becomes visible only when the block exits cleanly and matches the expected
        digest and size, if given; otherwise the temp file is removed and the error re-raised.
        """
        if expected_sha256 is not None:
            check_sha256(expected_sha256)
        if expected_size is not None and expected_size < 0:
            raise ValueError("expected_size must be >= 0")
        fd, temp_name = tempfile.mkstemp(
            dir=self._temp_dir, prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX
        )
        writer = BlobWriter(fd, Path(temp_name), expected_sha256, expected_size)
        try:
            yield writer
            writer._commit(self)
        except BaseException:
            writer._abort()
            raise

    def put_bytes(self, data: bytes) -> BlobRef:
        with self.writer() as writer:
            writer.write(data)
        assert writer.ref is not None
        return writer.ref

    def put_file(self, path: str | os.PathLike[str]) -> BlobRef:
        with open(path, "rb") as source, self.writer() as writer:
            while chunk := source.read(_CHUNK):
                writer.write(chunk)
        assert writer.ref is not None
        return writer.ref

    def adopt(self, path: str | os.PathLike[str], sha256: str, size: int) -> BlobRef:
        """Store a file by hard-linking it into place: no copy, no re-read.

        The caller vouches for ``sha256``: use it only for a file private to this process whose
        digest was computed over the very bytes written to it (the coordinator's upload
        staging). The size is checked, the file fsynced, then linked under a temp name and
        renamed into place like any write, so a blob is still visible only complete. ``path``
        keeps its link. On another filesystem it falls back to a copy that verifies the digest.
        """
        check_sha256(sha256)
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != size:
                raise BlobMismatch(f"{path} has {os.fstat(fd).st_size} bytes, expected {size}")
            os.fsync(fd)
        finally:
            os.close(fd)
        temp = self._temp_dir / f"{_TEMP_PREFIX}{secrets.token_hex(16)}{_TEMP_SUFFIX}"
        try:
            os.link(path, temp)
        except OSError:  # another filesystem, or no hard links there
            with open(path, "rb") as source, self.writer(sha256, size) as writer:
                while chunk := source.read(_CHUNK):
                    writer.write(chunk)
            assert writer.ref is not None
            return writer.ref
        try:
            os.utime(temp)  # a fresh mtime, so gc(min_age_seconds) spares it until referenced
            self._install(temp, sha256)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return BlobRef(sha256, size)

    def open(self, sha256: str) -> io.BufferedReader:
        """Open for reading; reading to the end raises ``BlobCorrupted`` if the digest is off."""
        try:
            file = io.FileIO(self.path(sha256), "rb")
        except FileNotFoundError:
            raise BlobNotFound(sha256) from None
        return io.BufferedReader(_VerifyingReader(sha256, file), _CHUNK)

    def read_bytes(self, sha256: str) -> bytes:
        with self.open(sha256) as blob:
            return blob.read()

    def verify(self, sha256: str) -> bool:
        """True if the stored content matches its digest; ``BlobNotFound`` if it is missing."""
        try:
            with self.open(sha256) as blob:
                while blob.read(_CHUNK):
                    pass
        except BlobCorrupted:
            return False
        return True

    def delete(self, sha256: str) -> int:
        """Remove a blob; returns the bytes freed (0 if it was not there)."""
        path = self.path(sha256)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        _fsync_dir(path.parent)
        return size

    def iter_blobs(self) -> Iterator[str]:
        """Digests of all stored blobs, in sorted order; stray files are ignored."""
        for shard in sorted(self._blob_dir.iterdir()):
            if not (shard.is_dir() and _SHARD_RE.fullmatch(shard.name)):
                continue
            for blob in sorted(shard.iterdir()):
                if _REST_RE.fullmatch(blob.name) and blob.is_file():
                    yield shard.name + blob.name

    def gc(self, referenced: Iterable[str], min_age_seconds: float = 0.0) -> GcResult:
        """Remove every blob not in ``referenced``.

        Blobs written in the last ``min_age_seconds`` are kept: an upload in progress has
        blobs that nothing references yet, so a sweep on a running coordinator needs a margin.
        """
        keep = set(referenced)
        cutoff = time.time() - min_age_seconds
        removed: list[str] = []
        freed = 0
        for sha256 in list(self.iter_blobs()):
            if sha256 in keep:
                continue
            try:
                if min_age_seconds > 0 and self.path(sha256).stat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue
            freed += self.delete(sha256)
            removed.append(sha256)
        return GcResult(len(removed), freed, tuple(removed))

    def cleanup_temp(self, older_than_seconds: float = 0.0) -> int:
        """Remove temp files left by interrupted writes; returns how many.

        Call it at start, before any write begins, or with an age margin while running.
        """
        cutoff = time.time() - older_than_seconds
        removed = 0
        for entry in self._temp_dir.iterdir():
            if not (entry.name.startswith(_TEMP_PREFIX) and entry.name.endswith(_TEMP_SUFFIX)):
                continue
            try:
                if older_than_seconds > 0 and entry.stat().st_mtime > cutoff:
                    continue
                entry.unlink()
            except FileNotFoundError:
                continue
            removed += 1
        return removed

    def _install(self, temp_path: Path, sha256: str) -> None:
        """Rename a complete, fsynced temp file into place and make the rename durable.

        An existing blob of the same digest is replaced, which also repairs a corrupted copy.
        """
        destination = self.path(sha256)
        shard = destination.parent
        if not shard.is_dir():
            shard.mkdir(exist_ok=True)
            _fsync_dir(self._blob_dir)
        os.replace(temp_path, destination)
        _fsync_dir(shard)
