"""The HTTP routes: authenticate, hand the body to :mod:`.serving`, return what it gives.

Each route names the gRPC method it mirrors; the caller must hold a role that may call that
method (:mod:`.auth`). Responses and refusals are documented in ``docs/http-api.md``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import StreamingResponse

from moerge.coordinator.http import protocol as api
from moerge.coordinator.http import serving
from moerge.coordinator.http.auth import INFERENCE, caller
from moerge.coordinator.state import CoordinatorState
from moerge.storage.records import Principal

router = APIRouter()
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": api.ErrorResponse} for status in (400, 401, 403, 404, 429, 503)
}

GenerateCaller = Annotated[Principal, Depends(caller(INFERENCE + "Generate"))]
PredictCaller = Annotated[Principal, Depends(caller(INFERENCE + "Predict"))]
RouteCaller = Annotated[Principal, Depends(caller(INFERENCE + "Route"))]
ModelsCaller = Annotated[Principal, Depends(caller(INFERENCE + "Route", counted=False))]


def _state(request: Request) -> CoordinatorState:
    return request.app.state.coordinator


@router.get("/v1/models", response_model=api.ModelList, responses=ERRORS)
async def list_models(request: Request, _caller: ModelsCaller) -> api.ModelList:
    """Every ``model=`` value: ``moerge`` (routed), each trained routing method, each active
    expert (pinned) and each composition (``composition/NAME``), as gRPC ``ListModels``."""
    return await serving.list_models(_state(request), request.app.state.started)


@router.post("/v1/completions", response_model=api.CompletionResponse, responses=ERRORS)
async def create_completion(
    body: api.CompletionRequest, request: Request, principal: GenerateCaller
) -> api.CompletionResponse | StreamingResponse:
    """OpenAI's completions: a routed (or pinned) generation; ``stream`` for SSE chunks."""
    return await serving.completion(body, _state(request), principal)


@router.post("/v1/chat/completions", response_model=api.ChatCompletionResponse, responses=ERRORS)
async def create_chat_completion(
    body: api.ChatCompletionRequest, request: Request, principal: GenerateCaller
) -> api.ChatCompletionResponse | StreamingResponse:
    """OpenAI's chat completions, rendered with the base model's chat template."""
    return await serving.chat_completion(body, _state(request), principal)


@router.post("/v1/predict", response_model=api.PredictResponse, responses=ERRORS)
async def predict(
    body: api.InputsRequest, request: Request, principal: PredictCaller
) -> api.PredictResponse:
    """gRPC ``Predict`` as JSON: a label (or text) per input, and who answered."""
    return await serving.predict(body, _state(request), principal)


@router.post("/v1/route", response_model=api.RouteResponse, responses=ERRORS)
async def route(
    body: api.InputsRequest, request: Request, principal: RouteCaller
) -> api.RouteResponse:
    """gRPC ``Route`` as JSON: the experts and weights the router picks per input."""
    return await serving.route(body, _state(request), principal)
