"""Sweep what no one will come back for: unreferenced blobs and abandoned uploads.

Crashes and abandoned clients leave bytes behind that are invisible but take disk space:

* a blob that nothing references: the artifact of a router fit killed after it was stored, or
  the files of an upload whose registry commit failed after they were linked into the store;
* the staged bytes of an upload that was never finished (the client gave up, or its expert
  was refused after a full disk), and its registry row.

:func:`sweep` removes both, with margins that keep it safe on a running coordinator: a blob is
only removed if it is older than ``blob_min_age_seconds`` (an upload being committed links its
files into the store, with a fresh modification time, before the registry references them),
and an upload only if nothing touched it for ``stale_upload_seconds`` (a client that resumes
after that starts a new upload). The coordinator runs it at start and then every
``housekeeping_interval_seconds``; every removal is logged, and deleted uploads are audited.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moerge.coordinator.uploads.receiver import UploadReceiver
from moerge.refusals import NotFound
from moerge.storage.blobstore import BlobStore
from moerge.storage.registry import Registry

if TYPE_CHECKING:
    from moerge.coordinator.uploads.object_uploads import ObjectUploads

log = logging.getLogger(__name__)

ACTOR = "system:housekeeping"


@dataclass(frozen=True)
class SweepResult:
    """What one garbage-collection sweep removed: blobs, their bytes and stale uploads."""

    blobs_removed: int
    bytes_freed: int
    uploads_removed: int


def sweep(
    registry: Registry,
    blobs: BlobStore,
    uploads: UploadReceiver,
    *,
    blob_min_age_seconds: float,
    stale_upload_seconds: float,
    objects: ObjectUploads | None = None,
) -> SweepResult:
    """Remove stale unfinished uploads, then unreferenced blobs older than the margin.

    With direct uploads (``objects``), a stale upload's staging objects and multipart uploads
    in the store go too.
    """
    removed_uploads = 0
    cutoff = time.time() - stale_upload_seconds
    for info in registry.stale_uploads(older_than_seconds=stale_upload_seconds):
        # bytes streamed without a status call do not touch the registry row: ask the disk
        if uploads.last_write(info.contributor_id, info.upload_id) > cutoff:
            continue
        uploads.discard(info.contributor_id, info.upload_id)
        if objects is not None:
            names = [str(f["name"]) for f in info.manifest.get("files", ())]
            objects.discard(info.contributor_id, info.upload_id, names)
        try:
            registry.delete_upload(ACTOR, info.contributor_id, info.upload_id)
        except NotFound:  # removed meanwhile (e.g. by a concurrent sweep)
            continue
        removed_uploads += 1
        log.info(
            "removed upload %s of contributor %s (%s, untouched since %s)",
            info.upload_id,
            info.contributor_id,
            info.state,
            info.updated_at,
        )
    gc = blobs.gc(registry.referenced_blobs(), min_age_seconds=blob_min_age_seconds)
    if gc.removed:
        log.info("removed %d unreferenced blob(s), %d bytes", gc.removed, gc.bytes_freed)
    return SweepResult(gc.removed, gc.bytes_freed, removed_uploads)


async def run_periodically(
    registry: Registry,
    blobs: BlobStore,
    uploads: UploadReceiver,
    *,
    interval_seconds: float,
    blob_min_age_seconds: float,
    stale_upload_seconds: float,
    objects: ObjectUploads | None = None,
) -> None:
    """:func:`sweep` now and every ``interval_seconds`` (off the event loop) until cancelled."""
    while True:
        try:
            await asyncio.to_thread(
                sweep,
                registry,
                blobs,
                uploads,
                blob_min_age_seconds=blob_min_age_seconds,
                stale_upload_seconds=stale_upload_seconds,
                objects=objects,
            )
        except asyncio.CancelledError:
            raise
        except Exception:  # a failed sweep (e.g. database down) must not stop the next one
            log.exception("housekeeping sweep failed; trying again in %.0f s", interval_seconds)
        await asyncio.sleep(interval_seconds)
