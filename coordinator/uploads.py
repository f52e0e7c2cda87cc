"""Resumable expert uploads: stage the byte stream, verify it, validate it, then commit.

An upload is one byte stream: the manifest's files back to back. Bytes are appended to a staging
file ``<data>/uploads/<contributor>/<upload_id>.part``; its size *is* the resume offset, so a
coordinator killed mid-stream resumes from whatever reached the disk. Nothing becomes visible in
the registry or the blob store until every file's size and sha256 match the manifest and the
expert passes :mod:`moerge.coordinator.validation`; a refused expert leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from moerge.coordinator.base_model import BaseModelSpec
from moerge.coordinator.validation import ExpertInvalid, ValidatedExpert, validate_expert_dir
from moerge.expert_format import EXPERT_FILES
from moerge.storage.blobstore import BlobStore
from moerge.storage.errors import FailedPrecondition, InvalidArgument
from moerge.storage.records import ExpertInfo, NewExpert, StatisticsSummary, UploadInfo
from moerge.storage.registry import Registry
from moerge.storage.validation import check_name, check_text

UPLOAD_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_DESCRIPTION = 4000


@dataclass(frozen=True)
class ManifestFile:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    upload_id: str
    expert_name: str
    task_name: str
    task_description: str
    files: tuple[ManifestFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def as_dict(self) -> dict[str, object]:
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


class UploadReceiver:
    """Plain (grpc-free) upload logic used by the ContributorService servicer."""

    def __init__(
        self,
        registry: Registry,
        blobs: BlobStore,
        staging_dir: Path,
        spec: BaseModelSpec,
        max_bytes: int,
    ) -> None:
        self.registry = registry
        self.blobs = blobs
        self.staging_dir = Path(staging_dir)
        self.spec = spec
        self.max_bytes = max_bytes
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, contributor_id: str, upload_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((contributor_id, upload_id), threading.Lock())

    def _part(self, contributor_id: str, upload_id: str) -> Path:
        return self.staging_dir / contributor_id / f"{upload_id}.part"

    def status(self, contributor_id: str, upload_id: str) -> UploadInfo:
        info = self.registry.get_upload(contributor_id, upload_id)
        if info.state == "receiving":
            part = self._part(contributor_id, upload_id)
            received = part.stat().st_size if part.exists() else 0
            if received != info.received_bytes:
                self.registry.set_upload_progress(contributor_id, upload_id, received)
                info = self.registry.get_upload(contributor_id, upload_id)
        return info

    def start(self, contributor_id: str, manifest: Manifest) -> UploadInfo:
        """Open (or reopen, to resume) an upload; returns the offset the client must send from."""
        manifest.check(self.max_bytes)
        info = self.registry.begin_upload(
            contributor_id, manifest.upload_id, manifest.as_dict(), manifest.total_bytes
        )
        if info.state == "failed":
            raise FailedPrecondition(f"upload {manifest.upload_id} was refused: {info.error}")
        if info.state == "receiving":
            part = self._part(contributor_id, manifest.upload_id)
            part.parent.mkdir(parents=True, exist_ok=True)
            part.touch(exist_ok=True)
            return self.status(contributor_id, manifest.upload_id)
        return info

    def append(self, contributor_id: str, upload_id: str, offset: int, data: bytes) -> int:
        """Append a chunk at ``offset`` (which must equal the bytes held); return the new size."""
        with self._lock(contributor_id, upload_id):
            info = self.registry.get_upload(contributor_id, upload_id)
            if info.state != "receiving":
                raise FailedPrecondition(f"upload {upload_id} is {info.state}")
            part = self._part(contributor_id, upload_id)
            held = part.stat().st_size if part.exists() else 0
            if offset != held:
                raise FailedPrecondition(
                    f"chunk.offset {offset} != {held} bytes held; resume from {held}"
                )
            if held + len(data) > info.total_bytes:
                raise InvalidArgument(
                    "chunk.data", f"overruns the manifest's total of {info.total_bytes} bytes"
                )
            with open(part, "ab") as handle:
                handle.write(data)
            return held + len(data)

    def finish(self, actor: str, contributor_id: str, upload_id: str) -> tuple[ExpertInfo, bool]:
        """Verify every file, validate the expert, store blobs, and commit in one transaction."""
        with self._lock(contributor_id, upload_id):
            info = self.registry.get_upload(contributor_id, upload_id)
            if info.state == "committed" and info.expert_id:
                return self.registry.get_expert(info.expert_id), False
            part = self._part(contributor_id, upload_id)
            held = part.stat().st_size if part.exists() else 0
            self.registry.set_upload_progress(contributor_id, upload_id, held)
            if held < info.total_bytes:
                raise FailedPrecondition(
                    f"upload {upload_id} holds {held} of {info.total_bytes} bytes; send the rest"
                )
            manifest = info.manifest
            unpacked = part.with_suffix(".d")
            try:
                files = self._unpack(part, unpacked, manifest["files"])
                checked = validate_expert_dir(unpacked, self.spec, self.max_bytes)
            except (ExpertInvalid, InvalidArgument) as exc:
                self.registry.fail_upload(contributor_id, upload_id, str(exc))
                part.unlink(missing_ok=True)
                raise
            try:
                refs = {name: self.blobs.put_file(unpacked / name) for name in files}
                spec = NewExpert(
                    name=manifest["expert_name"],
                    task_name=manifest["task_name"],
                    task_description=manifest["task_description"],
                    task_type=checked.task_type,
                    base_model_id=self.spec.model_id,
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
                        },
                    ),
                )
                result = self.registry.commit_upload(actor, contributor_id, upload_id, spec)
            finally:
                shutil.rmtree(unpacked, ignore_errors=True)
            part.unlink(missing_ok=True)
            return result

    @staticmethod
    def _unpack(part: Path, out: Path, files: list[dict[str, object]]) -> list[str]:
        """Split the staged stream into its files, checking each size and sha256."""
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        names = []
        with open(part, "rb") as stream:
            for entry in files:
                name, size, want = str(entry["name"]), int(entry["size"]), str(entry["sha256"])
                digest = hashlib.sha256()
                remaining = size
                with open(out / name, "wb") as handle:
                    while remaining:
                        block = stream.read(min(remaining, 1 << 20))
                        if not block:
                            break
                        digest.update(block)
                        handle.write(block)
                        remaining -= len(block)
                if remaining or digest.hexdigest() != want:
                    shutil.rmtree(out, ignore_errors=True)
                    raise InvalidArgument(name, "sha256 or size does not match the manifest")
                names.append(name)
        return names

    def discard(self, contributor_id: str, upload_id: str) -> None:
        """Remove the staging file of an abandoned upload."""
        part = self._part(contributor_id, upload_id)
        part.unlink(missing_ok=True)
        shutil.rmtree(part.with_suffix(".d"), ignore_errors=True)


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
