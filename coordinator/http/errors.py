"""One table from gRPC status codes to HTTP statuses, and OpenAI-shaped JSON error bodies.

Domain errors are mapped exactly as for gRPC, by :func:`moerge.coordinator.rpc.status.status_for`;
this module only turns the resulting gRPC code into an HTTP status (the mapping of
``google/rpc/code.proto``, which grpc-gateway uses too). FAILED_PRECONDITION is 400, as there: it
says the request cannot be served in the coordinator's present state (no active expert, a
classification model asked for text, an expert pinned that is not active); HTTP's 412 is about
conditional headers (``If-Match``), which this API does not take.

Bodies have OpenAI's shape, so that the ``openai`` package raises its usual exceptions
(``BadRequestError``, ``AuthenticationError``, ...) with the message::

    {"error": {"message": "...", "type": "invalid_request_error", "code": "invalid_argument"}}
"""

from __future__ import annotations

from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from moerge.coordinator.rpc.status import status_for

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

#: OpenAI's ``error.type`` words by HTTP status (anything else 5xx: ``server_error``)
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    429: "rate_limit_error",
}


class ApiError(Exception):
    """A refusal already turned into an HTTP status, an OpenAI error body and headers."""

    def __init__(
        self, status: int, message: str, code: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}

    @classmethod
    def of(cls, exc: BaseException) -> ApiError:
        """The status :func:`status_for` gives ``exc`` over gRPC, as HTTP."""
        code, message = status_for(exc)
        retry_after = getattr(exc, "retry_after_seconds", None)
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        return cls(HTTP_STATUS[code], message, code.name.lower(), headers)

    def body(self) -> dict[str, Any]:
        """The OpenAI-style error body: message, OpenAI's error type for the status and the gRPC
        code's name."""
        kind = ERROR_TYPES.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )
        return {"error": {"message": self.message, "type": kind, "code": self.code}}

    def response(self) -> JSONResponse:
        """The error as a JSON response with its status and headers (Retry-After)."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _invalid_body(_request: Request, exc: Exception) -> JSONResponse:
    """A body pydantic refuses: 400 naming the first bad field (OpenAI and vLLM answer 400)."""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request"
    return ApiError(400, message, "invalid_argument").response()


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals (unknown path, wrong method) in the same shape."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return ApiError(exc.status_code, str(exc.detail), code, dict(exc.headers or {})).response()


def install(app: FastAPI) -> None:
    """Answer every refusal of ``app`` with an OpenAI-shaped body."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(HTTPException, _http_error)
