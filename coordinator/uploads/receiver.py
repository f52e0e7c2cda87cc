"""Resumable expert uploads: stage the byte stream, verify it, validate it, then commit.

An upload is one byte stream: the manifest's files back to back. Each file's bytes go straight
into its own staging file ``<data>/uploads/<contributor>/<upload_id>.d/<name>`` while a sha256
per file advances over the same bytes, so nothing is re-read to split or hash the stream at the
end. The staged sizes *are* the resume offset: a coordinator killed mid-stream resumes from
whatever reached the disk (it re-hashes that prefix once, on the first request after the
restart). Nothing becomes visible in the registry or the blob store until every file's size and
sha256 match the manifest and the expert passes :mod:`moerge.coordinator.uploads.validation`; the
verified files are then hard-linked into the blob store (:meth:`BlobStore.adopt`) instead of
copied. A refused expert leaves nothing behind.

Replicas may share one staging folder (``upload_staging_dir``, on a filesystem they all mount):
a chunked upload then resumes through any of them. Each takes an ``flock`` on the upload while
it writes, and checks before each chunk that the files still hold what it last saw, since
another replica may have written since.

Bytes reach :class:`UploadReceiver` as gRPC ``UploadChunk`` messages
(:meth:`~UploadReceiver.append`). With an object store, contributors PUT them into the store
instead (:mod:`moerge.coordinator.uploads.object_uploads`), which shares :meth:`UploadReceiver.open`
and :func:`expert_spec` with this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moerge.coordinator.uploads.base_model import BaseModelSpec
from moerge.coordinator.uploads.privacy_policy import effective_report
from moerge.coordinator.uploads.validation import (
    ExpertInvalid,
    ValidatedExpert,
    validate_expert_dir,
)
from moerge.expert_format import EXPERT_FILES
from moerge.refusals import FailedPrecondition, InvalidArgument
from moerge.storage.blobstore import BlobRef, BlobStore
from moerge.storage.records import ExpertInfo, NewExpert, StatisticsSummary, UploadInfo
from moerge.storage.registry import Registry
from moerge.storage.validation import check_name, check_text

log = logging.getLogger(__name__)

UPLOAD_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
_BLOCK = 1 << 20
MAX_DESCRIPTION = 4000


@dataclass(frozen=True)
class ManifestFile:
    """One file an upload announces: name, size and SHA-256."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What an upload announces before its bytes: ids, names and files."""

    upload_id: str
    expert_name: str
    task_name: str
    task_description: str
    files: tuple[ManifestFile, ...]

    @property
    def total_bytes(self) -> int:
        """The bytes of all the files together."""
        return sum(f.size for f in self.files)

    def as_dict(self) -> dict[str, object]:
        """The manifest as JSON-ready values, as the registry records it."""
        return {
            "upload_id": self.upload_id,
            "expert_name": self.expert_name,
            "task_name": self.task_name,
            "task_description": self.task_description,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in self.files],
        }

    def check(self, max_bytes: int) -> None:
        """Refuse malformed manifests with an error naming the field."""
        if not UPLOAD_ID.match(self.upload_id):
            raise InvalidArgument("manifest.upload_id", "must be 8-64 characters of [A-Za-z0-9_-]")
        check_name("manifest.expert_name", self.expert_name)
        check_name("manifest.task_name", self.task_name)
        check_text("manifest.task_description", self.task_description, MAX_DESCRIPTION)
        names = [f.name for f in self.files]
        if sorted(names) != sorted(EXPERT_FILES):
            raise InvalidArgument(
                "manifest.files", f"must be exactly {list(EXPERT_FILES)}, got {names}"
            )
        for f in self.files:
            if f.size < 0:
                raise InvalidArgument(f"manifest.files[{f.name}].size", "is negative")
            if not SHA256.match(f.sha256):
                raise InvalidArgument(
                    f"manifest.files[{f.name}].sha256", "must be 64 lowercase hex characters"
                )
        if self.total_bytes > max_bytes:
            raise InvalidArgument(
                "manifest.files",
                f"total {self.total_bytes} bytes exceeds the limit of {max_bytes}",
            )


class _Staged:
    """One upload being received: its staging folder and a running sha256 per manifest file.

    Private to :class:`UploadReceiver` and used under its per-upload lock. Every file exists
    from the start; ``held`` counts the bytes on disk in manifest order (a file is filled
    before the next one gets any).
    """

    def __init__(self, folder: Path, files: list[dict[str, Any]]) -> None:
        self.folder = folder
        self.files = [(str(f["name"]), int(f["size"]), str(f["sha256"])) for f in files]
        self.total = sum(size for _, size, _ in self.files)
        self.hashes = [hashlib.sha256() for _ in self.files]
        self.held = 0
        folder.mkdir(parents=True, exist_ok=True)
        self._rehash()

    def _rehash(self) -> None:
        """Hash what is already on disk (after a restart); empty every file after a gap."""
        gap = False
        for (name, size, _), digest in zip(self.files, self.hashes, strict=True):
            with open(self.folder / name, "ab+") as handle:
                if gap or handle.tell() > size:
                    handle.truncate(0 if gap else size)
                handle.seek(0)
                while block := handle.read(_BLOCK):
                    digest.update(block)
                    self.held += len(block)
                gap = handle.tell() < size

    def pieces(self, count: int) -> list[tuple[int, int, int]]:
        """Where the next ``count`` bytes go: ``(file index, start, end)`` within them."""
        result, begin, start = [], 0, 0
        for index, (_, size, _) in enumerate(self.files):
            end = begin + size
            position = self.held + start
            if start < count and position < end:
                take = min(count - start, end - position)
                result.append((index, start, start + take))
                start += take
            begin = end
        return result

    def write(self, data: bytes) -> None:
        """Append ``data`` at ``held``: split it across files, hash it, write it."""
        view = memoryview(data)
        for index, start, end in self.pieces(len(view)):
            with open(self.folder / self.files[index][0], "ab") as handle:
                handle.write(view[start:end])
            self.hashes[index].update(view[start:end])
        self.held += len(view)

    def current(self) -> bool:
        """Whether the files on disk still hold ``held`` bytes (a replica sharing the staging
        folder may have written or removed them since)."""
        try:
            on_disk = sum((self.folder / name).stat().st_size for name, _, _ in self.files)
        except FileNotFoundError:
            return False
        return on_disk == self.held

    def mismatch(self) -> str | None:
        """The first file whose size or sha256 differs from the manifest, if any."""
        for (name, size, want), digest in zip(self.files, self.hashes, strict=True):
            if (self.folder / name).stat().st_size != size or digest.hexdigest() != want:
                return name
        return None


class UploadReceiver:
    """Plain (grpc-free) upload logic used by the ContributorService servicer."""

    def __init__(
        self,
        registry: Registry,
        blobs: BlobStore,
        staging_dir: Path,
        spec: BaseModelSpec,
        max_bytes: int,
        shared: bool = False,
    ) -> None:
        self.registry = registry
        self.blobs = blobs
        self.staging_dir = Path(staging_dir)
        self.shared = shared  # other processes stage in the same folder (upload_staging_dir)
        self.spec = spec
        self.max_bytes = max_bytes
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._staged: dict[tuple[str, str], _Staged] = {}

    @contextlib.contextmanager
    def _lock(self, contributor_id: str, upload_id: str) -> Iterator[None]:
        """The upload to this thread alone: a lock per upload in this process and, when the
        staging folder is shared, an ``flock`` on ``<contributor>/<upload_id>.lock`` against
        other processes. The lock file goes with the upload's staged files; a process that
        waited on the removed one then finds the upload committed or refused and writes
        nothing. Asking the status of an upload that is not receiving leaves its empty lock
        file: one per upload id asked about."""
        with self._locks_guard:
            lock = self._locks.setdefault((contributor_id, upload_id), threading.Lock())
        with lock:
            if not self.shared:
                yield
                return
            folder = self.staging_dir / contributor_id
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{upload_id}.lock", "ab") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
                yield

    def _folder(self, contributor_id: str, upload_id: str) -> Path:
        return self.staging_dir / contributor_id / f"{upload_id}.d"

    def _stage(self, contributor_id: str, upload_id: str, info: UploadInfo) -> _Staged:
        """The upload's staging state; rebuilt from disk on first use (e.g. after a restart).

        Call with the upload's lock held and only for a ``receiving`` upload.
        """
        key = (contributor_id, upload_id)
        staged = self._staged.get(key)
        if staged is None or not staged.current():
            folder = self._folder(contributor_id, upload_id)
            staged = self._staged[key] = _Staged(folder, info.manifest["files"])
        return staged

    def _drop(self, contributor_id: str, upload_id: str) -> None:
        """Forget the staging state and remove the staged files (and the lock file: see
        :meth:`_lock`)."""
        self._staged.pop((contributor_id, upload_id), None)
        shutil.rmtree(self._folder(contributor_id, upload_id), ignore_errors=True)
        (self.staging_dir / contributor_id / f"{upload_id}.lock").unlink(missing_ok=True)

    def status(self, contributor_id: str, upload_id: str) -> UploadInfo:
        """An upload's record, its received bytes brought up to what is staged here (the record is
        not written chunk by chunk)."""
        with self._lock(contributor_id, upload_id):
            info = self.registry.get_upload(contributor_id, upload_id)
            if info.state == "receiving":
                received = self._stage(contributor_id, upload_id, info).held
                if received != info.received_bytes:
                    info = self.registry.set_upload_progress(contributor_id, upload_id, received)
            return info

    def open(self, contributor_id: str, manifest: Manifest) -> UploadInfo:
        """Begin (or find again) the upload's registry row; a refused upload stays refused."""
        manifest.check(self.max_bytes)
        info = self.registry.begin_upload(
            contributor_id, manifest.upload_id, manifest.as_dict(), manifest.total_bytes
        )
        if info.state == "failed":
            raise FailedPrecondition(f"upload {manifest.upload_id} was refused: {info.error}")
        return info

    def start(self, contributor_id: str, manifest: Manifest) -> UploadInfo:
        """Open (or reopen, to resume) an upload; returns the offset the client must send from."""
        info = self.open(contributor_id, manifest)
        if info.state == "receiving":
            return self.status(contributor_id, manifest.upload_id)
        return info

    def append(self, contributor_id: str, upload_id: str, offset: int, data: bytes) -> int:
        """Append a chunk at ``offset`` (which must equal the bytes held); return the new size."""
        with self._lock(contributor_id, upload_id):
            staged = self._receiving(contributor_id, upload_id, offset, len(data))
            try:
                staged.write(data)
            except BaseException:
                # e.g. a full disk: forget the hashes, rebuild them from what reached the disk
                self._staged.pop((contributor_id, upload_id), None)
                raise
            return staged.held

    def _receiving(self, contributor_id: str, upload_id: str, offset: int, count: int) -> _Staged:
        """The staging state of a receiving upload that ``count`` bytes at ``offset`` fit.

        The registry is asked only when this process has no current staging state for the
        upload: while it has, the upload is ``receiving`` (finishing or refusing it drops the
        state, and a replica sharing the folder that finishes it removes the files).
        Call with the upload's lock held.
        """
        staged = self._staged.get((contributor_id, upload_id))
        if staged is None or not staged.current():  # new here, or written by another replica
            info = self.registry.get_upload(contributor_id, upload_id)
            if info.state != "receiving":
                raise FailedPrecondition(f"upload {upload_id} is {info.state}")
            staged = self._stage(contributor_id, upload_id, info)
        if offset != staged.held:
            raise FailedPrecondition(
                f"chunk.offset {offset} != {staged.held} bytes held; resume from {staged.held}"
            )
        if staged.held + count > staged.total:
            raise InvalidArgument(
                "chunk.data", f"overruns the manifest's total of {staged.total} bytes"
            )
        return staged

    def finish(self, actor: str, contributor_id: str, upload_id: str) -> tuple[ExpertInfo, bool]:
        """Verify every file, validate the expert, store blobs, and commit in one transaction."""
        with self._lock(contributor_id, upload_id):
            info = self.registry.get_upload(contributor_id, upload_id)
            if info.state == "committed" and info.expert_id:
                return self.registry.get_expert(info.expert_id), False
            if info.state != "receiving":
                raise FailedPrecondition(f"upload {upload_id} is {info.state}")
            staged = self._stage(contributor_id, upload_id, info)
            self.registry.set_upload_progress(contributor_id, upload_id, staged.held)
            if staged.held < staged.total:
                raise FailedPrecondition(
                    f"upload {upload_id} holds {staged.held} of {staged.total} bytes; send the rest"
                )
            manifest = info.manifest
            try:
                bad = staged.mismatch()
                if bad is not None:
                    raise InvalidArgument(bad, "sha256 or size does not match the manifest")
                checked = validate_expert_dir(staged.folder, self.spec, self.max_bytes)
            except (ExpertInvalid, InvalidArgument) as exc:
                self.registry.fail_upload(contributor_id, upload_id, str(exc))
                self._drop(contributor_id, upload_id)
                raise
            except OSError:
                raise  # e.g. a read error: transient, finishing again may succeed
            except Exception as exc:
                # A defect of validation itself: the same bytes would fail the same way on
                # every retry, so the upload is refused for good rather than left wedged.
                log.exception("validating upload %s of %s failed", upload_id, contributor_id)
                self.registry.fail_upload(
                    contributor_id, upload_id, f"validation failed ({type(exc).__name__})"
                )
                self._drop(contributor_id, upload_id)
                raise
            # Hard links, not moves: if the commit below fails the staged files stay, and
            # finishing again needs no re-upload.
            refs = {
                name: self.blobs.adopt(staged.folder / name, digest.hexdigest(), size)
                for (name, size, _), digest in zip(staged.files, staged.hashes, strict=True)
            }
            spec = expert_spec(manifest, checked, refs, self.spec)
            result = self.registry.commit_upload(actor, contributor_id, upload_id, spec)
            self._drop(contributor_id, upload_id)
            return result

    def last_write(self, contributor_id: str, upload_id: str) -> float:
        """When bytes of this upload were last staged (epoch seconds; 0 if none are)."""
        folder = self._folder(contributor_id, upload_id)
        times = [0.0]
        for path in (folder, *folder.glob("*")) if folder.exists() else ():
            try:
                times.append(path.stat().st_mtime)
            except FileNotFoundError:
                continue
        return max(times)

    def discard(self, contributor_id: str, upload_id: str) -> None:
        """Remove the staged files of an abandoned upload."""
        with self._lock(contributor_id, upload_id):
            self._drop(contributor_id, upload_id)


def expert_spec(
    manifest: dict[str, object],
    checked: ValidatedExpert,
    refs: dict[str, BlobRef],
    spec: BaseModelSpec,
) -> NewExpert:
    """The registry row of a verified, validated upload (both upload paths)."""
    return NewExpert(
        name=str(manifest["expert_name"]),
        task_name=str(manifest["task_name"]),
        task_description=str(manifest["task_description"]),
        task_type=checked.task_type,
        base_model_id=spec.model_id,
        lora_rank=checked.lora_rank,
        target_modules=checked.target_modules,
        label_names=checked.label_names,
        example_count=checked.example_count,
        files=refs,
        statistics=StatisticsSummary(
            hidden_size=checked.meta.hidden_size,
            covariance_rank=checked.meta.covariance_rank,
            gate_modules=len(checked.meta.gate_modules),
            dp=_dp_dict(checked),
            summary={
                "label_counts": checked.meta.label_counts,
                "modules": checked.modules,
                "privacy": asdict(effective_report(checked.meta)),  # docs/security.md
                # as recorded by `moerge train`; shown by `admin experts show` (docs/training.md)
                "quality": None if checked.meta.quality is None else asdict(checked.meta.quality),
            },
        ),
    )


def _dp_dict(checked: ValidatedExpert) -> dict[str, object] | None:
    meta = checked.meta
    if meta.dp is None:
        return None
    return {
        "epsilon": meta.dp.epsilon,
        "delta": meta.dp.delta,
        "clip_norm": meta.dp.clip_norm,
        "noise_std": dict(meta.dp.noise_std),
    }
