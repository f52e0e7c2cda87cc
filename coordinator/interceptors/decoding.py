"""Request bytes that do not parse are refused with INVALID_ARGUMENT, not grpc's UNKNOWN.

grpc parses each request before any servicer code runs and reports a parse failure as UNKNOWN,
which reads as a server fault. This interceptor gives moerge's RPCs a parser that returns an
:class:`Undecodable` marker instead of raising; the handler then refuses the marker with
INVALID_ARGUMENT, naming the message type.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from moerge.refusals import InvalidArgument

SERVICE_PREFIX = "/moerge.v1."


class Undecodable:
    """Stands in for a request whose bytes are not a valid message of the expected type."""

    def __init__(self, type_name: str) -> None:
        self.message = f"the request is not a valid {type_name} message"


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    type_name = descriptor.full_name if descriptor is not None else "protobuf"

    def parse_or_mark(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:  # protobuf's DecodeError, or a RuntimeError from the C++ parser
            return Undecodable(type_name)

    return parse_or_mark


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise InvalidArgument("request", request.message)
        yield request


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    """Innermost interceptor: lenient parsing plus an INVALID_ARGUMENT refusal of bad bytes.

    The lenient handler depends on the servicer's handler only, so it is built once per method
    and handed out again while the servicer's handler is the same object (every call).
    """

    def __init__(self) -> None:
        #: method -> (the servicer's handler, its lenient wrapper)
        self._lenient: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Give a moerge method's handler a lenient request parser (an ``Undecodable`` marker,
        refused as INVALID_ARGUMENT, instead of grpc's UNKNOWN); other services' handlers pass
        through. Wrapped handlers are kept per method."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if (
            handler is None
            or handler.request_deserializer is None
            or not method.startswith(SERVICE_PREFIX)
        ):
            return handler
        known = self._lenient.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = _lenient_handler(handler)
        self._lenient[method] = (handler, wrapped)
        return wrapped


def _lenient_handler(handler: Any) -> grpc.RpcMethodHandler:
    """``handler`` (grpc.RpcMethodHandler, untyped in grpc) with a parser that marks bad bytes,
    and a refusal of the marker."""
    kwargs = {
        "request_deserializer": _lenient(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.stream_unary:
        inner_stream = handler.stream_unary

        async def stream(requests: AsyncIterator[Any], context: Any) -> Any:
            return await inner_stream(_checked(requests), context)

        return grpc.stream_unary_rpc_method_handler(stream, **kwargs)
    return handler  # moerge has no server-streaming RPCs
