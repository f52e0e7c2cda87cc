"""One table from domain errors to gRPC status codes (the servicers' only error policy).

Handlers, services and the registry raise plain exceptions, the refusals of
:mod:`moerge.refusals` above all; :func:`status_for` picks the code and a message that is safe to
show the caller. The HTTP API maps the code this gives to an HTTP status
(:mod:`moerge.coordinator.http.errors`), so both edges refuse alike. Unexpected exceptions become
INTERNAL with no detail (the log has the trace).
"""

from __future__ import annotations

import errno
import logging

import grpc
from sqlalchemy.exc import OperationalError

from moerge import refusals

log = logging.getLogger(__name__)

STATUS_BY_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (refusals.NotFound, grpc.StatusCode.NOT_FOUND),
    (refusals.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (refusals.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (refusals.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (refusals.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (refusals.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (refusals.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OperationalError, grpc.StatusCode.UNAVAILABLE),
)


# No space left, over quota, or over the file-size limit (RLIMIT_FSIZE): all "disk full".
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message an exception is answered with: the table's code for a refusal
    (the engine's input errors are refusals too), RESOURCE_EXHAUSTED for a full disk, else
    INTERNAL (logged here, no details sent)."""
    for error_type, code in STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            if code is grpc.StatusCode.UNAVAILABLE:
                return code, "the registry database is unavailable; try again"
            return code, str(exc)
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "the coordinator is out of disk space (its storage is full); try again later",
        )
    log.exception("unexpected error while serving an RPC", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error (see the coordinator's log)"
