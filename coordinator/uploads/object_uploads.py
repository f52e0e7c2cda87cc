"""Direct uploads: contributors PUT the expert's bytes into the object store, not through us.

With an S3 blob store (``blob_store = "s3://..."``), :meth:`ObjectUploads.plan` opens (or
resumes) an upload in the registry, keeps one S3 multipart upload per manifest file under
``<prefix>uploads/<contributor>/<upload_id>/<file>`` (outside the content-addressed names, so
nothing is visible), and hands out a presigned ``UploadPart`` URL per part that has not
arrived. Each URL is signed together with the part's SHA-256 (``x-amz-checksum-sha256``), so
S3 or MinIO refuses bytes that do not match it. Which parts arrived is the store's own answer
(``ListParts``), so a client that was cut off, or whose replica died, resumes through any
replica with nothing kept in a coordinator's memory.

:meth:`ObjectUploads.complete` finishes each multipart upload, then reads every file back
from the store into a private folder while hashing each part and each file (a store that does
not check part checksums, such as moto's test server, is covered too), validates the expert
exactly as an upload over gRPC (:func:`~moerge.coordinator.uploads.validation.validate_expert_dir`),
copies the staged objects to their content-addressed names inside the store, and only then
commits the registry row. A part that does not match its SHA-256 is dropped so the client can
send it again; files that do not match the manifest, or fail validation, fail the upload.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from moerge.coordinator.uploads.receiver import SHA256, Manifest, UploadReceiver, expert_spec
from moerge.coordinator.uploads.validation import ExpertInvalid, validate_expert_dir
from moerge.refusals import FailedPrecondition, InvalidArgument
from moerge.storage.blobstore import CHUNK
from moerge.storage.blobstore_s3 import UPLOADS, S3BlobStore, checksum_header, is_not_found
from moerge.storage.records import ExpertInfo, UploadInfo
from moerge.storage.registry import Registry

MIN_PART_BYTES = 5 << 20  # S3's smallest part but the last


@dataclass(frozen=True)
class PartTarget:
    """Where one part goes: ``url`` is empty when the part is already in the store."""

    file: str
    part_number: int
    offset: int
    size: int
    sha256: str
    uploaded: bool
    url: str = ""


def part_count(size: int, part_size: int) -> int:
    """Parts of a file of ``size`` bytes: ``max(1, ceil(size / part_size))``."""
    return max(1, math.ceil(size / part_size))


class ObjectUploads:
    """Plan, resume and commit direct uploads into one S3 store; grpc-free, thread-safe."""

    def __init__(
        self,
        registry: Registry,
        store: S3BlobStore,
        receiver: UploadReceiver,
        part_size: int,
        url_seconds: float,
        presigner: Any = None,  # a boto3 S3 client (untyped)
    ) -> None:
        if part_size < MIN_PART_BYTES:
            raise ValueError(f"object_part_bytes must be >= {MIN_PART_BYTES} (S3's minimum)")
        self.registry = registry
        self.store = store
        self.receiver = receiver  # manifest checks, registry start, validation spec, staging dir
        self.part_size = part_size
        self.url_seconds = url_seconds
        self.presigner = presigner or store.client  # a client for the endpoint users reach

    def _key(self, contributor_id: str, upload_id: str, name: str) -> str:
        return f"{self.store.prefix}{UPLOADS}{contributor_id}/{upload_id}/{name}"

    def _check_parts(self, manifest: Manifest, parts: dict[str, list[str]]) -> None:
        for f in manifest.files:
            digests = parts.get(f.name, [])
            want = part_count(f.size, self.part_size)
            if len(digests) != want:
                raise InvalidArgument(
                    f"files[{f.name}].part_sha256",
                    f"has {len(digests)} digests; {f.size} bytes in parts of {self.part_size} "
                    f"make {want}",
                )
            for digest in digests:
                if not SHA256.match(digest):
                    raise InvalidArgument(
                        f"files[{f.name}].part_sha256", "must be 64 lowercase hex characters"
                    )

    def _multipart(self, key: str, create: bool) -> str | None:
        """The id of the file's multipart upload; every replica picks the same one."""
        listing = self.store.client.list_multipart_uploads(Bucket=self.store.bucket, Prefix=key)
        found = sorted(
            (u["Initiated"], u["UploadId"]) for u in listing.get("Uploads", ()) if u["Key"] == key
        )
        if found:
            return str(found[0][1])
        if not create:
            return None
        started = self.store.client.create_multipart_upload(
            Bucket=self.store.bucket, Key=key, ChecksumAlgorithm="SHA256"
        )
        return str(started["UploadId"])

    def _arrived(self, key: str, upload_id: str) -> dict[int, dict[str, object]]:
        paginator = self.store.client.get_paginator("list_parts")
        parts: dict[int, dict[str, object]] = {}
        for page in paginator.paginate(Bucket=self.store.bucket, Key=key, UploadId=upload_id):
            for part in page.get("Parts", ()):
                parts[int(part["PartNumber"])] = part
        return parts

    def _staged_size(self, key: str) -> int | None:
        """Size of a file whose multipart upload was already completed, else None."""
        try:
            head = self.store.client.head_object(Bucket=self.store.bucket, Key=key)
        except ClientError as error:
            if is_not_found(error):
                return None
            raise
        return int(head["ContentLength"])

    def progress(self, contributor_id: str, upload_id: str) -> UploadInfo | None:
        """A direct upload's bytes in the store (parts arrived, files already completed),
        recorded in the registry; ``None`` when the store holds nothing of this upload (a
        chunked gRPC upload, whose bytes the receiver stages on local disk).

        The store is the truth for direct uploads: parts go to it without passing through any
        replica, so a replica's local staging knows nothing of them.
        """
        info = self.registry.get_upload(contributor_id, upload_id)
        if info.state != "receiving":
            return info
        held, found = 0, False
        for f in info.manifest.get("files", ()):
            key = self._key(contributor_id, upload_id, str(f["name"]))
            size = self._staged_size(key)
            if size is not None:
                found, held = True, held + size
                continue
            multipart = self._multipart(key, create=False)
            if multipart is not None:
                found = True
                held += sum(int(p["Size"]) for p in self._arrived(key, multipart).values())  # type: ignore[call-overload]
        if not found:
            return None
        if held != info.received_bytes:
            info = self.registry.set_upload_progress(contributor_id, upload_id, held)
        return info

    def plan(
        self, contributor_id: str, manifest: Manifest, parts: dict[str, list[str]]
    ) -> tuple[UploadInfo, list[PartTarget]]:
        """Open or resume the upload; a target per part, with a URL for each missing one."""
        manifest.check(self.receiver.max_bytes)
        self._check_parts(manifest, parts)
        info = self.receiver.open(contributor_id, manifest)
        if info.state != "receiving":
            return info, []
        targets: list[PartTarget] = []
        held = 0
        for f in manifest.files:
            key = self._key(contributor_id, manifest.upload_id, f.name)
            done = self._staged_size(key) == f.size
            upload_id = None if done else self._multipart(key, create=True)
            arrived = {} if upload_id is None else self._arrived(key, upload_id)
            for index, digest in enumerate(parts[f.name]):
                number = index + 1
                offset = index * self.part_size
                size = min(self.part_size, f.size - offset)
                got = arrived.get(number)
                uploaded = done or (got is not None and int(got["Size"]) == size)  # type: ignore[call-overload]
                url = ""
                if uploaded:
                    held += size
                else:
                    url = self.presigner.generate_presigned_url(
                        "upload_part",
                        Params={
                            "Bucket": self.store.bucket,
                            "Key": key,
                            "UploadId": upload_id,
                            "PartNumber": number,
                            "ChecksumSHA256": checksum_header(digest),
                            "ChecksumAlgorithm": "SHA256",
                        },
                        ExpiresIn=int(self.url_seconds),
                    )
                targets.append(PartTarget(f.name, number, offset, size, digest, uploaded, url))
        info = self.registry.set_upload_progress(contributor_id, manifest.upload_id, held)
        return info, targets

    def complete(
        self, actor: str, contributor_id: str, manifest: Manifest, parts: dict[str, list[str]]
    ) -> tuple[ExpertInfo, bool]:
        """Finish the multipart uploads, verify and validate from the store, then commit."""
        upload_id = manifest.upload_id
        info = self.registry.get_upload(contributor_id, upload_id)
        if info.state == "committed" and info.expert_id:
            return self.registry.get_expert(info.expert_id), False
        if info.state != "receiving":
            raise FailedPrecondition(f"upload {upload_id} is {info.state}")
        self._check_parts(manifest, parts)
        for f in manifest.files:
            self._finish_file(
                self._key(contributor_id, upload_id, f.name), f.name, f.size, len(parts[f.name])
            )
        folder = self.receiver.staging_dir / contributor_id / f"{upload_id}.o"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            for f in manifest.files:
                key = self._key(contributor_id, upload_id, f.name)
                whole = self._read_back(key, folder / f.name, parts[f.name], f.name)
                if whole != f.sha256 or (folder / f.name).stat().st_size != f.size:
                    self._refuse(
                        contributor_id,
                        manifest,
                        f"{f.name}: sha256 or size does not match the manifest",
                    )
            try:
                checked = validate_expert_dir(folder, self.receiver.spec, self.receiver.max_bytes)
            except ExpertInvalid as exc:
                self._refuse(contributor_id, manifest, str(exc))
            refs = {
                f.name: self.store.copy_in(
                    self._key(contributor_id, upload_id, f.name), f.sha256, f.size
                )
                for f in manifest.files
            }
            spec = expert_spec(manifest.as_dict(), checked, refs, self.receiver.spec)
            result = self.registry.commit_upload(actor, contributor_id, upload_id, spec)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.discard(contributor_id, upload_id, [f.name for f in manifest.files])
        return result

    def _finish_file(self, key: str, name: str, size: int, count: int) -> None:
        if self._staged_size(key) == size:
            return  # completed by an earlier commit that stopped later
        upload_id = self._multipart(key, create=False)
        arrived = {} if upload_id is None else self._arrived(key, upload_id)
        missing = [n for n in range(1, count + 1) if n not in arrived]
        if upload_id is None or missing:
            raise FailedPrecondition(
                f"{name}: parts {missing or list(range(1, count + 1))} have not arrived; "
                "upload them (StartObjectUpload gives URLs) and complete again"
            )
        completed = []
        for number in range(1, count + 1):
            part = {"PartNumber": number, "ETag": arrived[number]["ETag"]}
            if arrived[number].get("ChecksumSHA256"):
                part["ChecksumSHA256"] = arrived[number]["ChecksumSHA256"]
            completed.append(part)
        self.store.client.complete_multipart_upload(
            Bucket=self.store.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": completed},
        )

    def _read_back(self, key: str, path: Path, digests: list[str], name: str) -> str:
        """Download a staged file, hashing every part and the whole; returns the whole's sha256.

        A part whose bytes do not match its digest (a store that does not check checksums)
        removes the staged object: the client sends the file again.
        """
        body = self.store.client.get_object(Bucket=self.store.bucket, Key=key)["Body"]
        whole = hashlib.sha256()
        with open(path, "wb") as out:
            for number, digest in enumerate(digests, start=1):
                part = hashlib.sha256()
                remaining = self.part_size
                while remaining and (block := body.read(min(CHUNK, remaining))):
                    part.update(block)
                    whole.update(block)
                    out.write(block)
                    remaining -= len(block)
                if part.hexdigest() != digest:
                    body.close()
                    self.store.client.delete_object(Bucket=self.store.bucket, Key=key)
                    raise FailedPrecondition(
                        f"{name}: part {number} does not match its sha256; send the file again"
                    )
            if body.read(1):
                raise InvalidArgument(name, "has more bytes than its parts")
        return whole.hexdigest()

    def _refuse(self, contributor_id: str, manifest: Manifest, reason: str) -> None:
        self.registry.fail_upload(contributor_id, manifest.upload_id, reason)
        self.discard(contributor_id, manifest.upload_id, [f.name for f in manifest.files])
        raise InvalidArgument("upload", reason)

    def discard(self, contributor_id: str, upload_id: str, names: list[str]) -> None:
        """Remove an upload's staged objects and abort its unfinished multipart uploads."""
        for name in names:
            key = self._key(contributor_id, upload_id, name)
            while (multipart := self._multipart(key, create=False)) is not None:
                self.store.client.abort_multipart_upload(
                    Bucket=self.store.bucket, Key=key, UploadId=multipart
                )
            self.store.client.delete_object(Bucket=self.store.bucket, Key=key)
