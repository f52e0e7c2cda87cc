"""What the interceptors build once instead of on every call, and that it still behaves."""

from __future__ import annotations

import asyncio

import grpc

from moerge.coordinator.interceptors.decoding import DecodeInterceptor, Undecodable
from moerge.coordinator.interceptors.metrics import RpcMetrics
from moerge.v1 import inference_pb2

PREDICT = "/moerge.v1.InferenceService/Predict"


def _details(method: str) -> grpc.HandlerCallDetails:
    class Details(grpc.HandlerCallDetails):
        def __init__(self) -> None:
            self.method = method
            self.invocation_metadata = ()

    return Details()


def _servicer_handler() -> grpc.RpcMethodHandler:
    async def predict(request, _context):  # type: ignore[no-untyped-def]
        return inference_pb2.PredictResponse(note=request.inputs[0])

    return grpc.unary_unary_rpc_method_handler(
        predict,
        request_deserializer=inference_pb2.PredictRequest.FromString,
        response_serializer=inference_pb2.PredictResponse.SerializeToString,
    )


def test_the_lenient_handler_is_built_once_per_servicer_handler():
    interceptor = DecodeInterceptor()
    served = _servicer_handler()

    async def continuation(_details):  # type: ignore[no-untyped-def]
        return served

    async def twice() -> tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]:
        first = await interceptor.intercept_service(continuation, _details(PREDICT))
        second = await interceptor.intercept_service(continuation, _details(PREDICT))
        return first, second

    first, second = asyncio.run(twice())
    assert first is second and first is not served
    # still lenient: bad bytes become the marker, good bytes the message
    assert isinstance(first.request_deserializer(b"\xff\xff\xff"), Undecodable)
    good = inference_pb2.PredictRequest(inputs=["x"]).SerializeToString()
    assert first.request_deserializer(good).inputs == ["x"]


def test_a_new_servicer_handler_for_a_method_gets_its_own_lenient_handler():
    interceptor = DecodeInterceptor()
    handlers = [_servicer_handler(), _servicer_handler()]

    async def wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        async def continuation(_details):  # type: ignore[no-untyped-def]
            return handler

        return await interceptor.intercept_service(continuation, _details(PREDICT))

    first, second = (asyncio.run(wrap(h)) for h in handlers)
    assert first is not second


def test_metrics_count_every_call_by_method_and_code_with_remembered_children():
    metrics = RpcMetrics()
    for _ in range(3):
        metrics.observe(PREDICT, grpc.StatusCode.OK, 0.01)
    metrics.observe(PREDICT, grpc.StatusCode.INVALID_ARGUMENT, 0.01)
    assert metrics.requests(PREDICT) == 3
    assert metrics.requests(PREDICT, "INVALID_ARGUMENT") == 1
    count = metrics.registry.get_sample_value(
        "moerge_grpc_request_duration_seconds_count", {"method": PREDICT}
    )
    assert count == 4
