"""The blob store on an S3-compatible object store (AWS S3, MinIO, GCS's S3 API), via boto3.

A blob is the object ``<prefix>sha256/ab/cdef...`` of one bucket, so several coordinator
replicas share one store. Writes stream into a local temp file while the digest advances, then
one upload (multipart above 8 MiB, boto3's ``upload_file``) with an ``x-amz-checksum-sha256``
per part, which the store checks, puts the whole object in place: S3 never shows a partial
object. Reads verify the digest as they stream (:class:`~moerge.storage.blobstore.BlobStore`).

Direct uploads (``coordinator/uploads/object_uploads.py``) stage contributors' bytes under
``<prefix>uploads/``, outside the content-addressed names, so gc never sees them;
:meth:`abort_stale_multipart` ends multipart uploads nobody finished.

Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
a profile, an instance role); the endpoint of a non-AWS store is ``s3_endpoint_url``.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from moerge.storage.blobstore import BlobMismatch, BlobNotFound, BlobRef, BlobStore, check_sha256

_KEY_RE = re.compile(r"sha256/([0-9a-f]{2})/([0-9a-f]{62})")
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")
UPLOADS = "uploads/"  # staging area of direct uploads, under the prefix
_TRANSFER = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=16 << 20)


def checksum_header(digest_hex: str) -> str:
    """The value of ``x-amz-checksum-sha256``: the digest in base64, not hex."""
    return base64.b64encode(bytes.fromhex(digest_hex)).decode()


def make_client(endpoint_url: str = "", region: str = "") -> Any:
    """A boto3 S3 client; path-style addressing, which MinIO and local servers need.

    botocore's own check of response checksums is left to when an operation requires it: a
    multipart object's stored checksum is a checksum of part checksums, which copies and
    some servers report inconsistently, and every read is verified against the blob's
    SHA-256 here anyway.
    """
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or None,
        region_name=region or None,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 5, "mode": "standard"},
            response_checksum_validation="when_required",
        ),
    )


def is_not_found(error: ClientError) -> bool:
    """Whether an S3 error means the object is missing (providers answer 404, NoSuchKey or
    NotFound)."""
    return str(error.response.get("Error", {}).get("Code")) in _NOT_FOUND


class S3BlobStore(BlobStore):
    """Blobs as objects of one bucket under a key prefix."""

    def __init__(
        self, client: Any, bucket: str, prefix: str, temp_dir: str | os.PathLike[str]
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.temp_dir = Path(temp_dir)
        self.temp_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_url(
        cls,
        url: str,
        temp_dir: str | os.PathLike[str],
        endpoint_url: str = "",
        region: str = "",
    ) -> S3BlobStore:
        """``s3://bucket[/prefix]``; the bucket must exist (the operator creates it)."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {url!r}")
        return cls(make_client(endpoint_url, region), bucket, prefix, temp_dir)

    def key(self, sha256: str) -> str:
        """The object key of a blob."""
        check_sha256(sha256)
        return f"{self.prefix}sha256/{sha256[:2]}/{sha256[2:]}"

    def size(self, sha256: str) -> int | None:
        """The object's ContentLength from a HEAD request, or None when it is missing."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
        except ClientError as error:
            if is_not_found(error):
                return None
            raise
        return int(head["ContentLength"])

    def _open_raw(self, sha256: str) -> IO[bytes]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key(sha256))
        except ClientError as error:
            if is_not_found(error):
                raise BlobNotFound(sha256) from None
            raise
        return response["Body"]

    def _install(self, temp_path: Path, ref: BlobRef) -> None:
        try:
            self.client.upload_file(
                str(temp_path),
                self.bucket,
                self.key(ref.sha256),
                ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                Config=_TRANSFER,
            )
        finally:
            temp_path.unlink(missing_ok=True)

    def adopt(self, path: str | os.PathLike[str], sha256: str, size: int) -> BlobRef:
        """Upload a staged file whose digest the caller computed (no second local hash)."""
        check_sha256(sha256)
        actual = os.stat(path).st_size
        if actual != size:
            raise BlobMismatch(f"{path} has {actual} bytes, expected {size}")
        self.client.upload_file(
            str(path),
            self.bucket,
            self.key(sha256),
            ExtraArgs={"ChecksumAlgorithm": "SHA256"},
            Config=_TRANSFER,
        )
        return BlobRef(sha256, size)

    def copy_in(self, source_key: str, sha256: str, size: int) -> BlobRef:
        """Make an object of this bucket, already verified by the caller, the blob ``sha256``:
        a server-side copy (no bytes through the coordinator)."""
        self.client.copy(
            {"Bucket": self.bucket, "Key": source_key},
            self.bucket,
            self.key(sha256),
            Config=_TRANSFER,
        )
        return BlobRef(sha256, size)

    def delete(self, sha256: str) -> int:
        """Delete the object; the bytes freed, from a HEAD first because S3's DELETE does not say (0
        if it was not there)."""
        size = self.size(sha256)
        if size is None:
            return 0
        self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        return size

    def _list(self) -> Iterator[tuple[str, float]]:
        paginator = self.client.get_paginator("list_objects_v2")
        found: list[tuple[str, float]] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}sha256/"):
            for item in page.get("Contents", ()):
                match = _KEY_RE.fullmatch(item["Key"][len(self.prefix) :])
                if match:
                    found.append((match[1] + match[2], item["LastModified"].timestamp()))
        yield from sorted(found)

    def cleanup_temp(self, older_than_seconds: float = 0.0) -> int:
        """Remove this process's local temp files older than ``older_than_seconds``.

        Unfinished multipart uploads in the bucket may belong to another replica's write in
        progress, so they are left to :meth:`abort_stale_multipart`, which the leader's
        housekeeping calls with a margin.
        """
        cutoff = time.time() - older_than_seconds
        removed = 0
        for entry in self.temp_dir.iterdir():
            try:
                if older_than_seconds > 0 and entry.stat().st_mtime > cutoff:
                    continue
                entry.unlink()
            except (FileNotFoundError, IsADirectoryError):
                continue
            removed += 1
        return removed

    def abort_stale_multipart(self, older_than_seconds: float, under: str = "") -> int:
        """Abort multipart uploads under ``<prefix><under>`` started more than
        ``older_than_seconds`` ago (a store bills their parts until then); returns how many."""
        cutoff = time.time() - older_than_seconds
        aborted = 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + under):
            for upload in page.get("Uploads", ()):
                if upload["Initiated"].timestamp() > cutoff:
                    continue
                try:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                except ClientError as error:
                    if "NoSuchUpload" not in str(error):
                        raise
                    continue
                aborted += 1
        return aborted
