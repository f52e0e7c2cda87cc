"""InferenceService logic: requests -> :class:`InferenceService` -> response messages.

Async (the micro-batcher awaits other requests), but still grpc-free: errors are plain
exceptions that :mod:`moerge.coordinator.rpc.status` maps to status codes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Sequence

from moerge.coordinator.inference.generation.sampling import SamplingParams
from moerge.coordinator.inference.plan import Aggregation
from moerge.coordinator.inference.results import ExamplePrediction, ExpertWeight
from moerge.coordinator.inference.service import InferenceService
from moerge.coordinator.state import CoordinatorState
from moerge.refusals import InvalidArgument
from moerge.storage.records import Principal
from moerge.storage.validation import MAX_INT32
from moerge.v1 import common_pb2, inference_pb2

AGGREGATIONS = {
    inference_pb2.AGGREGATION_UNSPECIFIED: None,
    inference_pb2.AGGREGATION_OUTPUT_ENSEMBLE: Aggregation.ENSEMBLE,
    inference_pb2.AGGREGATION_MERGE_LINEAR: Aggregation.MERGE_LINEAR,
    inference_pb2.AGGREGATION_MERGE_TIES: Aggregation.MERGE_TIES,
    inference_pb2.AGGREGATION_MERGE_DARE: Aggregation.MERGE_DARE_LINEAR,
    inference_pb2.AGGREGATION_MODULE_MIX: Aggregation.MODULE_MIX,
}
MAX_NEW_TOKENS = 512
MAX_EXPERT_FILTER = 1024  # expert_ids per request


def _common_checks(top_k: int, router_version: int, expert_ids: Sequence[str] = ()) -> None:
    if len(expert_ids) > MAX_EXPERT_FILTER:
        raise InvalidArgument("expert_ids", f"at most {MAX_EXPERT_FILTER} ids")
    if top_k < 0:
        raise InvalidArgument("top_k", "must be >= 0 (0: the router's default)")
    if not 0 <= router_version <= MAX_INT32:
        raise InvalidArgument(
            "router_version", f"must be in 0..{MAX_INT32} (0: the active version)"
        )


async def predict(
    request: inference_pb2.PredictRequest, state: CoordinatorState, principal: Principal
) -> inference_pb2.PredictResponse:
    """Check the request, then route, run the experts and aggregate on the inference service."""
    _common_checks(request.top_k, request.router_version, request.expert_ids)
    if request.aggregation not in AGGREGATIONS:
        raise InvalidArgument("aggregation", f"unknown value {request.aggregation}")
    if not 0 <= request.max_new_tokens <= MAX_NEW_TOKENS:
        raise InvalidArgument("max_new_tokens", f"must be in 0..{MAX_NEW_TOKENS}")
    inference = await state.inference_service()
    if request.composition:
        return await _predict_composition(request, inference)
    predictions, chosen, latency = await inference.predict(
        list(request.inputs),
        request.routing_method,
        request.router_version,
        list(request.expert_ids),
        request.top_k,
        AGGREGATIONS[request.aggregation],
        request.max_new_tokens,
    )
    return await _response(
        inference, predictions, chosen.version, chosen.method, chosen.note, latency
    )


async def _predict_composition(
    request: inference_pb2.PredictRequest, inference: InferenceService
) -> inference_pb2.PredictResponse:
    """A composition pinned by name: no router, so no routing field may be set."""
    _check_composition_request(request)
    predictions, info, latency = await inference.predict_composition(
        list(request.inputs),
        request.composition,
        request.composition_version,
        request.max_new_tokens,
    )
    note = f"composition {info.name} v{info.version}"
    return await _response(inference, predictions, 0, "composition", note, latency)


def _check_composition_request(
    request: inference_pb2.PredictRequest | inference_pb2.GenerateRequest,
) -> None:
    if request.routing_method or request.router_version or request.expert_ids or request.top_k:
        raise InvalidArgument(
            "composition",
            "a composition fixes its experts: leave routing_method, "
            "router_version, expert_ids and top_k unset",
        )
    if AGGREGATIONS[request.aggregation] not in (None, Aggregation.MERGE_LINEAR):
        raise InvalidArgument("aggregation", "a composition is served as a linear merge")
    if not 0 <= request.composition_version <= MAX_INT32:
        raise InvalidArgument("composition_version", f"must be in 0..{MAX_INT32} (0: newest)")


async def _response(
    inference: InferenceService,
    predictions: Sequence[ExamplePrediction],
    router_version: int,
    method: str,
    note: str,
    latency: float,
) -> inference_pb2.PredictResponse:
    ids = [w.expert_id for p in predictions for w in p.experts]
    names = await inference.expert_names(ids)
    return inference_pb2.PredictResponse(
        predictions=[
            inference_pb2.Prediction(
                output=p.output,
                confidence=p.confidence,
                experts=[
                    common_pb2.ExpertWeight(
                        expert_id=w.expert_id,
                        expert_name=names.get(w.expert_id, ""),
                        weight=w.weight,
                    )
                    for w in p.experts
                ],
                expert_outputs=[
                    inference_pb2.ExpertOutput(
                        expert_id=o.expert_id,
                        text=o.text,
                        scores=[
                            inference_pb2.LabelScore(label=label, probability=prob)
                            for label, prob in zip(o.labels, o.probabilities, strict=True)
                        ],
                    )
                    for o in p.expert_outputs
                ],
            )
            for p in predictions
        ],
        router_version=router_version,
        routing_method=method,
        aggregation=predictions[0].aggregation if predictions else "",
        note="; ".join(filter(None, [note, *{n for p in predictions for n in p.notes}])),
        latency_ms=latency,
    )


async def route(
    request: inference_pb2.RouteRequest, state: CoordinatorState, principal: Principal
) -> inference_pb2.RouteResponse:
    """Check the request, then the routing decision of each input alone."""
    _common_checks(request.top_k, request.router_version, request.expert_ids)
    inference = await state.inference_service()
    decisions, chosen, latency = await inference.route(
        list(request.inputs),
        request.routing_method,
        request.router_version,
        list(request.expert_ids),
        request.top_k,
    )
    names = await inference.expert_names([e for row in decisions for e, _ in row])
    return inference_pb2.RouteResponse(
        decisions=[
            inference_pb2.RouteDecision(
                experts=[
                    common_pb2.ExpertWeight(expert_id=e, expert_name=names.get(e, ""), weight=w)
                    for e, w in row
                ]
            )
            for row in decisions
        ],
        router_version=chosen.version,
        routing_method=chosen.method,
        note=chosen.note,
        latency_ms=latency,
    )


def sampling_params(
    message: inference_pb2.SamplingParams, default_max_new_tokens: int
) -> SamplingParams:
    """The request's sampling settings, unset fields at their documented defaults, checked."""
    return SamplingParams(
        max_new_tokens=message.max_new_tokens or default_max_new_tokens,
        temperature=message.temperature if message.HasField("temperature") else 0.0,
        top_p=message.top_p if message.HasField("top_p") else 1.0,
        top_k=message.top_k,
        seed=message.seed if message.HasField("seed") else None,
        stop=tuple(message.stop),
        repetition_penalty=(
            message.repetition_penalty if message.HasField("repetition_penalty") else 1.0
        ),
    ).check(MAX_NEW_TOKENS)


async def generate(
    request: inference_pb2.GenerateRequest, state: CoordinatorState, principal: Principal
) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
    """One GenerateStart, GenerateDelta per released text, one GenerateEnd (see the proto)."""
    from moerge.coordinator.inference import generation_service
    from moerge.coordinator.inference.generation.requests import (
        GenerationFinished,
        GenerationStarted,
        TextDelta,
    )

    _common_checks(request.top_k, request.router_version)
    if request.aggregation not in AGGREGATIONS:
        raise InvalidArgument("aggregation", f"unknown value {request.aggregation}")
    if request.composition:
        _check_composition_request(request)
    if len(request.expert_ids) > MAX_EXPERT_FILTER:
        raise InvalidArgument("expert_ids", f"at most {MAX_EXPERT_FILTER} ids")
    sampling = sampling_params(request.sampling, state.config.max_new_tokens)
    inference = await state.inference_service()
    stream = await generation_service.generate(
        inference,
        request.prompt,
        [(m.role, m.content) for m in request.messages],
        sampling,
        request.routing_method,
        request.router_version,
        list(request.expert_ids),
        request.top_k,
        AGGREGATIONS[request.aggregation],
        request.composition,
        request.composition_version,
    )

    async def weights(experts: Sequence[ExpertWeight]) -> list[common_pb2.ExpertWeight]:
        names = await inference.expert_names([w.expert_id for w in experts])
        return [
            common_pb2.ExpertWeight(
                expert_id=w.expert_id, weight=w.weight, expert_name=names.get(w.expert_id, "")
            )
            for w in experts
        ]

    async with contextlib.aclosing(stream.events) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                yield inference_pb2.GenerateResponse(
                    delta=inference_pb2.GenerateDelta(text=event.text, tokens=event.tokens)
                )
            elif isinstance(event, GenerationStarted):
                yield inference_pb2.GenerateResponse(
                    start=inference_pb2.GenerateStart(
                        experts=await weights(event.experts),
                        router_version=stream.chosen.version,
                        routing_method=stream.chosen.method,
                        aggregation=event.aggregation,
                        note=stream.chosen.note,
                        prompt_tokens=event.prompt_tokens,
                    )
                )
            elif isinstance(event, GenerationFinished):
                yield inference_pb2.GenerateResponse(
                    end=inference_pb2.GenerateEnd(
                        finish_reason=event.finish_reason,
                        prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens,
                        experts=await weights(event.experts),
                        confidence=event.confidence,
                        time_to_first_token_ms=event.time_to_first_token_ms,
                        latency_ms=event.latency_ms,
                    )
                )
