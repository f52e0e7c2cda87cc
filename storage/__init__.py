"""Persistent state of the coordinator: the expert registry (SQL) and the blob store.

The coordinator builds one :class:`Registry` from :func:`make_engine` and a :class:`BlobStore`
(:func:`open_blob_store`: local files or an S3-compatible object store),
calls :func:`upgrade` on every start, and never touches the ORM models directly. A refusal
raises one of :mod:`moerge.refusals`' errors (the coordinator raises the same ones).
"""

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
from moerge.storage.db import current_revision, make_engine, upgrade
from moerge.storage.records import (
    AuditEntryInfo,
    ContributorInfo,
    EnrollmentTokenInfo,
    ExpertInfo,
    NewExpert,
    Page,
    Principal,
    RouterVersionInfo,
    StatisticsSummary,
    UploadInfo,
)
from moerge.storage.registry import Registry

__all__ = [
    "AuditEntryInfo",
    "BlobCorrupted",
    "BlobMismatch",
    "BlobNotFound",
    "BlobRef",
    "BlobStore",
    "ContributorInfo",
    "EnrollmentTokenInfo",
    "ExpertInfo",
    "GcResult",
    "LocalBlobStore",
    "NewExpert",
    "Page",
    "Principal",
    "Registry",
    "RouterVersionInfo",
    "StatisticsSummary",
    "UploadInfo",
    "current_revision",
    "make_engine",
    "open_blob_store",
    "upgrade",
]
