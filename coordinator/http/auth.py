"""Who calls the HTTP API: the gRPC credentials, roles and token cache, read from HTTP headers.

``Authorization: Bearer <token>`` (the scheme is case-insensitive) is parsed by the same
:func:`~moerge.coordinator.interceptors.auth.bearer_token` as gRPC metadata and looked up
through the gRPC server's own :class:`~moerge.coordinator.interceptors.auth.AuthInterceptor`
(so a token revoked through either API is refused by both on the next call). Each route names
the gRPC method it mirrors, and may be called by exactly the roles
:func:`~moerge.coordinator.interceptors.auth.required_roles` allows for that method: there is
one role table, in :mod:`moerge.coordinator.interceptors.auth`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request

from moerge.coordinator.http.errors import ApiError
from moerge.coordinator.interceptors.auth import AuthInterceptor, bearer_token, required_roles
from moerge.refusals import PermissionDenied, Unauthenticated
from moerge.storage.records import Principal

INFERENCE = "/moerge.v1.InferenceService/"


def caller(method: str, *, counted: bool = True) -> Callable[[Request], Awaitable[Principal]]:
    """A FastAPI dependency: the authenticated caller allowed to call gRPC ``method``.

    ``counted``: the request draws from the caller's inference rate limit as ``method`` does
    over gRPC (429 with ``Retry-After`` beyond it); listing models is not counted.
    """
    roles = required_roles(method)
    if roles is None:
        raise ValueError(f"{method} is not an authenticated gRPC method")

    async def authenticated(request: Request) -> Principal:
        authenticator: AuthInterceptor = request.app.state.authenticator
        token = bearer_token((("authorization", request.headers.get("authorization")),))
        try:
            principal = await authenticator.principal(token) if token else None
        except Exception as exc:  # e.g. the database is down: 503, as UNAVAILABLE over gRPC
            raise ApiError.of(exc) from None
        if principal is None:
            error = ApiError.of(Unauthenticated("missing, unknown or revoked credential"))
            error.headers["WWW-Authenticate"] = "Bearer"
            raise error
        if principal.role not in roles:
            raise ApiError.of(PermissionDenied(f"role '{principal.role}' may not call {method}"))
        try:
            if counted:
                await authenticator.admit(principal, method)  # 429 + Retry-After beyond the limit
        except Exception as exc:
            raise ApiError.of(exc) from None
        return principal

    return authenticated
