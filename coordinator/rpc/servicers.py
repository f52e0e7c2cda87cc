"""gRPC servicers: translate between protobuf, plain handlers and status codes, nothing more.

Modelled on Flower's ``fleet_servicer.py``: each RPC hands its request, the coordinator state
and the caller to a handler in ``*_handler.py`` (which never imports grpc) on a worker thread,
and turns the handler's exceptions into status codes through :mod:`moerge.coordinator.rpc.status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from moerge.coordinator.interceptors.auth import current_principal
from moerge.coordinator.interceptors.rate_limit import UploadLimiter
from moerge.coordinator.rpc import (
    admin_handler,
    composition_handler,
    contributor_handler,
    inference_handler,
    models_handler,
)
from moerge.coordinator.rpc.status import status_for
from moerge.coordinator.state import CoordinatorState
from moerge.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    contributor_pb2,
    contributor_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

Response = TypeVar("Response")


async def _serve(
    handler: Callable[..., Response],
    request: Any,
    state: CoordinatorState,
    context: grpc.aio.ServicerContext,
    *,
    authenticated: bool = True,
) -> Response:
    """Run a plain handler off the event loop; map its exceptions to a status and abort."""
    args = (request, state, current_principal()) if authenticated else (request, state)
    try:
        return await asyncio.to_thread(handler, *args)
    except Exception as exc:
        code, message = status_for(exc)
        await context.abort(code, message, trailing_metadata=_retry_after(exc))
        raise  # unreachable: abort raises


def _retry_after(exc: Exception) -> tuple[tuple[str, str], ...]:
    """``retry-after`` (seconds) trailing metadata for a rate-limit refusal, else nothing."""
    retry_after = getattr(exc, "retry_after_seconds", None)
    return (("retry-after", str(retry_after)),) if retry_after else ()


class ContributorServicer(contributor_pb2_grpc.ContributorServiceServicer):
    def __init__(
        self,
        state: CoordinatorState,
        limits: UploadLimiter | None = None,
    ) -> None:
        self.state = state
        self.limits = limits or UploadLimiter.from_config(state.config)

    async def Join(self, request: contributor_pb2.JoinRequest, context: Any) -> Any:
        return await _serve(
            contributor_handler.join, request, self.state, context, authenticated=False
        )

    async def GetBaseModel(self, request: Any, context: Any) -> contributor_pb2.BaseModelInfo:
        return await _serve(contributor_handler.get_base_model, request, self.state, context)

    async def GetUploadStatus(self, request: Any, context: Any) -> contributor_pb2.UploadStatus:
        return await _serve(contributor_handler.get_upload_status, request, self.state, context)

    async def ListMyExperts(self, request: Any, context: Any) -> Any:
        return await _serve(contributor_handler.list_my_experts, request, self.state, context)

    async def RegisterNodeKey(self, request: Any, context: Any) -> Any:
        return await _serve(contributor_handler.register_node_key, request, self.state, context)

    async def StartObjectUpload(self, request: Any, context: Any) -> Any:
        limits = self.limits if self.limits.enabled else None
        handler = functools.partial(contributor_handler.start_object_upload, limits=limits)
        return await _serve(handler, request, self.state, context)

    async def CompleteObjectUpload(self, request: Any, context: Any) -> Any:
        return await _serve(
            contributor_handler.complete_object_upload, request, self.state, context
        )

    async def UploadExpert(
        self, request_iterator: AsyncIterator[contributor_pb2.UploadExpertRequest], context: Any
    ) -> contributor_pb2.UploadExpertResponse:
        """A manifest, then chunks; every step is a plain handler call.

        A paced upload (``upload_bytes_per_second``) waits here, on the event loop, not in a
        worker thread; a refused one gets ``retry-after`` (seconds) in its trailing metadata.
        """
        principal = current_principal()
        limits = self.limits if self.limits.enabled else None
        upload = contributor_handler.UploadSession(self.state, principal, limits)
        try:
            async for message in request_iterator:
                pause = await asyncio.to_thread(upload.receive, message)
                if pause:
                    await asyncio.sleep(pause)
            return await asyncio.to_thread(upload.finish)
        except Exception as exc:
            code, detail = status_for(exc)
            await context.abort(code, detail, trailing_metadata=_retry_after(exc))
            raise


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Async handlers: the micro-batcher needs the event loop, not a worker thread."""

    def __init__(self, state: CoordinatorState) -> None:
        self.state = state

    async def _serve(self, handler: Callable[..., Any], request: Any, context: Any) -> Any:
        try:
            return await handler(request, self.state, current_principal())
        except Exception as exc:
            code, detail = status_for(exc)
            await context.abort(code, detail)
            raise

    async def Predict(self, request: inference_pb2.PredictRequest, context: Any) -> Any:
        return await self._serve(inference_handler.predict, request, context)

    async def Route(self, request: inference_pb2.RouteRequest, context: Any) -> Any:
        return await self._serve(inference_handler.route, request, context)

    async def Generate(self, request: inference_pb2.GenerateRequest, context: Any) -> Any:
        try:
            stream = inference_handler.generate(request, self.state, current_principal())
            async with contextlib.aclosing(stream) as messages:
                async for message in messages:
                    yield message
        except Exception as exc:
            code, detail = status_for(exc)
            await context.abort(code, detail)

    async def Compose(self, request: inference_pb2.ComposeRequest, context: Any) -> Any:
        try:
            stream = composition_handler.compose(request, self.state, current_principal())
            async with contextlib.aclosing(stream) as messages:
                async for message in messages:
                    yield message
        except Exception as exc:
            code, detail = status_for(exc)
            await context.abort(code, detail)

    async def ListCompositions(
        self, request: inference_pb2.ListCompositionsRequest, context: Any
    ) -> Any:
        return await self._serve(composition_handler.list_compositions, request, context)

    async def ListModels(self, request: inference_pb2.ListModelsRequest, context: Any) -> Any:
        return await self._serve(models_handler.list_models, request, context)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, state: CoordinatorState) -> None:
        self.state = state

    async def ListExperts(self, request: Any, context: Any) -> admin_pb2.ListExpertsResponse:
        return await _serve(admin_handler.list_experts, request, self.state, context)

    async def GetExpert(self, request: Any, context: Any) -> common_pb2.Expert:
        return await _serve(admin_handler.get_expert, request, self.state, context)

    async def SetExpertState(self, request: Any, context: Any) -> common_pb2.Expert:
        return await _serve(admin_handler.set_expert_state, request, self.state, context)

    async def DeleteExpert(self, request: Any, context: Any) -> admin_pb2.DeleteExpertResponse:
        return await _serve(admin_handler.delete_expert, request, self.state, context)

    async def ListRouterVersions(self, request: Any, context: Any) -> Any:
        return await _serve(admin_handler.list_router_versions, request, self.state, context)

    async def TrainRouter(self, request: Any, context: Any) -> admin_pb2.RouterVersion:
        return await _serve(admin_handler.train_router, request, self.state, context)

    async def ActivateRouterVersion(self, request: Any, context: Any) -> admin_pb2.RouterVersion:
        return await _serve(admin_handler.activate_router_version, request, self.state, context)

    async def CreateEnrollmentToken(self, request: Any, context: Any) -> Any:
        return await _serve(admin_handler.create_enrollment_token, request, self.state, context)

    async def ListEnrollmentTokens(self, request: Any, context: Any) -> Any:
        return await _serve(admin_handler.list_enrollment_tokens, request, self.state, context)

    async def RevokeEnrollmentToken(self, request: Any, context: Any) -> Any:
        return await _serve(admin_handler.revoke_enrollment_token, request, self.state, context)

    async def CreateApiKey(self, request: Any, context: Any) -> Any:
        return await _serve(admin_handler.create_api_key, request, self.state, context)

    async def ListApiKeys(self, request: Any, context: Any) -> Any:
        return await _serve(admin_handler.list_api_keys, request, self.state, context)

    async def RevokeApiKey(self, request: Any, context: Any) -> admin_pb2.ApiKey:
        return await _serve(admin_handler.revoke_api_key, request, self.state, context)

    async def ListContributors(self, request: Any, context: Any) -> Any:
        return await _serve(admin_handler.list_contributors, request, self.state, context)

    async def RevokeContributor(self, request: Any, context: Any) -> admin_pb2.Contributor:
        return await _serve(admin_handler.revoke_contributor, request, self.state, context)

    async def ListAuditLog(self, request: Any, context: Any) -> admin_pb2.ListAuditLogResponse:
        return await _serve(admin_handler.list_audit_log, request, self.state, context)
