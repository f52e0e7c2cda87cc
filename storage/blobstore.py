"""The content-addressed blob store: one interface, a back end per store.

Expert files and router artifacts are blobs named by the SHA-256 of their bytes. Two back ends
implement :class:`BlobStore` (the shape of MLflow's artifact repositories: one interface, one
class per store, one test suite over all of them):

* :class:`~moerge.storage.blobstore_local.LocalBlobStore`, the default: files under one folder;
* :class:`~moerge.storage.blobstore_s3.S3BlobStore`: any S3-compatible object store (AWS S3,
  MinIO, GCS's S3 API) through ``boto3``, which several coordinator replicas can share.

What both guarantee, and this module implements once:

* **Content addressing**: a blob's name is its digest; writing the same bytes twice stores them
  once, and writing them again repairs a corrupted copy.
* **Only complete blobs are visible**: a write streams into a local temp file while a SHA-256
  advances over it, and only a complete blob that matches the expected digest and size is
  installed (a rename on a file system, one PUT of the whole object on S3).
* **Verification on read**: reading a blob to its end raises :class:`BlobCorrupted` when the
  bytes no longer match the name, so silent corruption is reported instead of served.
* **Garbage collection**: :meth:`BlobStore.gc` removes every blob nothing references, sparing
  those younger than a margin (an upload being committed stores blobs before the registry
  references them).

:func:`open_blob_store` picks the back end from a URL (``""`` or a path: local; ``s3://bucket/
prefix``: S3).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
CHUNK = 1 << 20
TEMP_PREFIX = "blob-"
TEMP_SUFFIX = ".tmp"


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
    """Refuse anything but 64 lowercase hex characters before it becomes part of a name."""
    if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
        raise ValueError(f"not a sha256 digest (64 lowercase hex characters): {sha256!r:.80}")
    return sha256


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` to ``fd``: ``os.write`` may write less than it is given."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class BlobWriter:
    """One streaming write into a local temp file; obtained from :meth:`BlobStore.writer`."""

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
        write_all(self._fd, data)
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
        ref = BlobRef(sha256, self._size)
        store._install(self._temp_path, ref)
        self.ref = ref
        return ref

    def _abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._temp_path.unlink(missing_ok=True)


class VerifyingReader(io.RawIOBase):
    """Reads a blob from any binary stream and checks its digest when the end is reached."""

    def __init__(self, sha256: str, source: IO[bytes]) -> None:
        super().__init__()
        self._source = source
        self._sha256 = sha256
        self._hash = hashlib.sha256()
        self._verified = False

    def readable(self) -> bool:
        """Always readable: io.BufferedReader asks before it reads."""
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Fill ``buffer`` from the source and hash what passes; at the end of the stream, compare
        the digest (``BlobCorrupted`` when it is off)."""
        if len(buffer) == 0:
            return 0
        data = self._source.read(len(buffer))
        count = len(data)
        if count:
            memoryview(buffer)[:count] = data
            self._hash.update(data)
        elif not self._verified:
            if self._hash.hexdigest() != self._sha256:
                raise BlobCorrupted(self._sha256)
            self._verified = True
        return count

    def close(self) -> None:
        """Close the source stream too, once."""
        if not self.closed:
            self._source.close()
        super().close()


class BlobStore(ABC):
    """Blobs named by their SHA-256, in some store; see the module docstring for the contract.

    A back end implements the few primitives below (``_install``, ``_open_raw``, ``size``,
    ``delete``, ``_list``, ``adopt``, ``cleanup_temp``); reading, verifying, writing and
    garbage collection are shared. ``temp_dir`` is a local folder for writes in progress.
    """

    temp_dir: Path

    # -- primitives of a back end ---------------------------------------------------------

    @abstractmethod
    def _install(self, temp_path: Path, ref: BlobRef) -> None:
        """Make a complete, verified local temp file the blob ``ref`` (consuming the file).

        An existing blob of the same digest is replaced, which also repairs a corrupted copy.
        """

    @abstractmethod
    def _open_raw(self, sha256: str) -> IO[bytes]:
        """The stored bytes, unverified; ``BlobNotFound`` when missing."""

    @abstractmethod
    def size(self, sha256: str) -> int | None:
        """Size in bytes, or None if the blob is not stored."""

    @abstractmethod
    def delete(self, sha256: str) -> int:
        """Remove a blob; returns the bytes freed (0 if it was not there)."""

    @abstractmethod
    def _list(self) -> Iterator[tuple[str, float]]:
        """``(sha256, last modified as epoch seconds)`` of every stored blob, sorted by digest."""

    @abstractmethod
    def adopt(self, path: str | os.PathLike[str], sha256: str, size: int) -> BlobRef:
        """Store a local file whose digest the caller computed over the very bytes written.

        The upload staging's shortcut: no second hash (a local store hard-links the file).
        """

    @abstractmethod
    def cleanup_temp(self, older_than_seconds: float = 0.0) -> int:
        """Remove what interrupted writes left (temp files, unfinished multipart uploads)."""

    # -- shared -------------------------------------------------------------------------------

    def exists(self, sha256: str) -> bool:
        """Whether a blob with this digest is stored."""
        return self.size(sha256) is not None

    def open(self, sha256: str) -> io.BufferedReader:
        """Open for reading; reading to the end raises ``BlobCorrupted`` if the digest is off."""
        check_sha256(sha256)
        return io.BufferedReader(VerifyingReader(sha256, self._open_raw(sha256)), CHUNK)

    def read_bytes(self, sha256: str) -> bytes:
        """The whole blob in memory, digest checked; for small blobs such as a router artifact."""
        with self.open(sha256) as blob:
            return blob.read()

    def verify(self, sha256: str) -> bool:
        """True if the stored content matches its digest; ``BlobNotFound`` if it is missing."""
        try:
            with self.open(sha256) as blob:
                while blob.read(CHUNK):
                    pass
        except BlobCorrupted:
            return False
        return True

    def fetch(self, sha256: str, destination: str | os.PathLike[str]) -> Path:
        """Write the blob to a local file, verified; nothing is left at ``destination`` if not.

        Readers that need a real file (safetensors, PEFT) get one; a local store may hard-link.
        """
        destination = Path(destination)
        temp = destination.with_name(destination.name + TEMP_SUFFIX)
        try:
            with self.open(sha256) as blob, open(temp, "wb") as out:
                while chunk := blob.read(CHUNK):
                    out.write(chunk)
            os.replace(temp, destination)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return destination

    def iter_blobs(self) -> Iterator[str]:
        """Digests of all stored blobs, in sorted order; stray files or keys are ignored."""
        for sha256, _ in self._list():
            yield sha256

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
        fd, temp_name = tempfile.mkstemp(dir=self.temp_dir, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
        writer = BlobWriter(fd, Path(temp_name), expected_sha256, expected_size)
        try:
            yield writer
            writer._commit(self)
        except BaseException:
            writer._abort()
            raise

    def put_bytes(self, data: bytes) -> BlobRef:
        """Store ``data`` through a writer (hashed, staged, installed atomically); its reference."""
        with self.writer() as writer:
            writer.write(data)
        assert writer.ref is not None
        return writer.ref

    def put_file(self, path: str | os.PathLike[str]) -> BlobRef:
        """Store a file's bytes in chunks, never the whole file in memory; its reference."""
        with open(path, "rb") as source, self.writer() as writer:
            while chunk := source.read(CHUNK):
                writer.write(chunk)
        assert writer.ref is not None
        return writer.ref

    def gc(self, referenced: Iterable[str], min_age_seconds: float = 0.0) -> GcResult:
        """Remove every blob not in ``referenced``.

        Blobs written in the last ``min_age_seconds`` are kept: an upload in progress has
        blobs that nothing references yet, so a sweep on a running coordinator needs a margin.
        """
        keep = set(referenced)
        cutoff = time.time() - min_age_seconds
        removed: list[str] = []
        freed = 0
        for sha256, modified in list(self._list()):
            if sha256 in keep or (min_age_seconds > 0 and modified > cutoff):
                continue
            freed += self.delete(sha256)
            removed.append(sha256)
        return GcResult(len(removed), freed, tuple(removed))


def open_blob_store(
    url: str,
    local_root: str | os.PathLike[str],
    temp_dir: str | os.PathLike[str],
    endpoint_url: str = "",
    region: str = "",
) -> BlobStore:
    """The store ``url`` names: ``""`` the folder ``local_root``; ``s3://bucket[/prefix]`` an
    S3-compatible store at ``endpoint_url`` (AWS when empty), credentials from boto3's usual
    chain, with ``temp_dir`` for its writes in progress."""
    if not url:
        from moerge.storage.blobstore_local import LocalBlobStore

        return LocalBlobStore(local_root)
    if url.startswith("s3://"):
        from moerge.storage.blobstore_s3 import S3BlobStore

        return S3BlobStore.from_url(url, temp_dir, endpoint_url, region)
    raise ValueError(f"blob_store must be '' (local files) or s3://BUCKET[/PREFIX], got {url!r}")
