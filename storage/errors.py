"""Errors the registry raises when it refuses a call; each maps to one gRPC status code.

Messages name the field or object concerned and are safe to show to the caller.
Database failures (for example a lost PostgreSQL connection) are not wrapped: they surface as
SQLAlchemy's ``OperationalError`` so that the coordinator can tell "refused" from "broken".
"""

from __future__ import annotations


class RegistryError(Exception):
    """A call the registry refused; the database is left as it was."""


class NotFound(RegistryError):
    """The object named in the call does not exist (NOT_FOUND)."""


class AlreadyExists(RegistryError):
    """An object with this identity exists already (ALREADY_EXISTS)."""


class InvalidArgument(RegistryError):
    """A user-supplied value is malformed (INVALID_ARGUMENT); ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class FailedPrecondition(RegistryError):
    """The object is not in a state that allows the call (FAILED_PRECONDITION)."""


class Unauthenticated(RegistryError):
    """A token is unknown, malformed, expired, exhausted or revoked (UNAUTHENTICATED)."""


class PermissionDenied(RegistryError):
    """The caller is known but may not do this, e.g. a revoked contributor (PERMISSION_DENIED)."""
