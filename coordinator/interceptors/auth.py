"""Token authentication and role checks, as one gRPC server interceptor.

Clients send ``authorization: Bearer <token>``. Tokens are looked up by id and their secret
compared in constant time against a stored hash (see :mod:`moerge.storage.tokens`); nothing
secret is logged. Each service has a set of roles that may call it; the authenticated
:class:`~moerge.storage.records.Principal` reaches the servicer through :func:`current_principal`.

Given the registry's ``generation``, accepted tokens are remembered (by their SHA-256, on the event
loop, no thread hop) until the registry is written or
:data:`~moerge.coordinator.services.registry_cache.MAX_AGE_SECONDS` pass; see
:mod:`moerge.coordinator.services.registry_cache`. A revoke through this coordinator is refused on
the very next call; rejected tokens are never remembered. A user API key's expiry is checked on
every call, cached or not.

Three roles: ``admin`` (everything but contributing), ``contributor`` (contributing and
inference) and ``user`` (inference only: an API key from ``moerge admin keys create``). Inference
calls are also counted against the caller's rate limit
(:mod:`moerge.coordinator.interceptors.inference_limit`).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import grpc

from moerge.coordinator.interceptors.inference_limit import InferenceLimiter, InferenceRateLimited
from moerge.coordinator.rpc.status import status_for
from moerge.coordinator.services.registry_cache import GenerationCache
from moerge.storage.records import Principal

PUBLIC_METHODS = frozenset(
    {
        "/moerge.v1.ContributorService/Join",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)

#: service prefix -> roles allowed to call its methods
SERVICE_ROLES: dict[str, frozenset[str]] = {
    "/moerge.v1.ContributorService/": frozenset({"contributor"}),
    "/moerge.v1.InferenceService/": frozenset({"contributor", "admin", "user"}),
    "/moerge.v1.AdminService/": frozenset({"admin"}),
}

_PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "moerge_principal", default=None
)


def current_principal() -> Principal:
    """The caller of the RPC being served (set by :class:`AuthInterceptor`)."""
    principal = _PRINCIPAL.get()
    if principal is None:
        raise RuntimeError("no authenticated principal in this context")
    return principal


def required_roles(method: str) -> frozenset[str] | None:
    """Roles that may call ``method``; None for public methods and methods we do not serve."""
    if method in PUBLIC_METHODS:
        return None
    for prefix, roles in SERVICE_ROLES.items():
        if method.startswith(prefix):
            return roles
    return None


def bearer_token(metadata: tuple[Any, ...] | None) -> str | None:
    """The token of ``authorization: Bearer <token>`` (the scheme is case-insensitive, RFC 7235)."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without a valid token; PERMISSION_DENIED for the wrong role."""

    def __init__(
        self,
        authenticate: Callable[[str], Principal | None],
        generation: Callable[[], int] | None = None,
        limiter: InferenceLimiter | None = None,
    ) -> None:
        self._authenticate = authenticate
        #: per-caller inference rate limits (None: unlimited); the HTTP API shares it
        self.limiter = limiter
        #: token digest -> principal; None without a ``generation`` to invalidate it by
        self._accepted: GenerationCache[Principal] | None = (
            GenerationCache(generation) if generation is not None else None
        )

    async def principal(self, token: str) -> Principal | None:
        """Who ``token`` belongs to (None: nobody); the HTTP API asks this same cache."""
        if self._accepted is None:
            principal = await asyncio.to_thread(self._authenticate, token)
        else:
            key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
            principal = self._accepted.get(key)
            if principal is None:
                generation = self._accepted.generation()
                principal = await asyncio.to_thread(self._authenticate, token)
                if principal is not None:
                    self._accepted.put(key, principal, generation)
        expires_at = principal.expires_at if principal is not None else None
        if expires_at is not None and expires_at <= datetime.now(timezone.utc):
            return None  # expired while remembered
        return principal

    async def admit(self, principal: Principal, method: str) -> None:
        """Count an inference call against the caller's rate limit (raises when over it)."""
        if self.limiter is not None:
            await self.limiter.admit(principal, method)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Wrap the method's handler so that each call authenticates its token and checks the role
        before the handler runs; unknown methods pass through."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        roles = required_roles(method)
        if handler is None or roles is None:
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        try:
            principal = await self.principal(token) if token else None
        except Exception as exc:  # e.g. the database is down: UNAVAILABLE, not UNKNOWN
            return _rejecting(handler, *status_for(exc))
        if principal is None:
            return _rejecting(
                handler, grpc.StatusCode.UNAUTHENTICATED, "missing, unknown or revoked credential"
            )
        if principal.role not in roles:
            return _rejecting(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"role '{principal.role}' may not call {method}",
            )
        try:
            await self.admit(principal, method)
        except InferenceRateLimited as exc:
            trailer = (("retry-after", str(exc.retry_after_seconds)),)
            return _rejecting(handler, *status_for(exc), trailer)
        return _with_principal(handler, principal)


def _rebuild(handler: grpc.RpcMethodHandler, unary: Any, streaming: Any) -> grpc.RpcMethodHandler:
    """A handler of the same kind and (de)serializers with a new behaviour."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kwargs)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kwargs)


def _rejecting(
    handler: grpc.RpcMethodHandler,
    code: grpc.StatusCode,
    message: str,
    trailing_metadata: tuple[tuple[str, str], ...] = (),
) -> Any:
    def unary(_behaviour: Any) -> Any:
        async def reject(_request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(code, message, trailing_metadata)

        return reject

    def streaming(_behaviour: Any) -> Any:
        async def reject(_request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(code, message, trailing_metadata)
            yield  # pragma: no cover  (makes this an async generator)

        return reject

    return _rebuild(handler, unary, streaming)


def _with_principal(handler: grpc.RpcMethodHandler, principal: Principal) -> Any:
    def unary(behaviour: Any) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = _PRINCIPAL.set(principal)
            try:
                return await behaviour(request, context)
            finally:
                _PRINCIPAL.reset(token)

        return call

    def streaming(behaviour: Any) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = _PRINCIPAL.set(principal)
            try:
                async for item in behaviour(request, context):
                    yield item
            finally:
                _PRINCIPAL.reset(token)

        return call

    return _rebuild(handler, unary, streaming)
