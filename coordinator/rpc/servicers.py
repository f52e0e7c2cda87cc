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
    """ContributorService: joining, the base model, uploads (streamed or direct to the object store)
    and the contributor's own experts."""

    def __init__(
        self,
        state: CoordinatorState,
        limits: UploadLimiter | None = None,
    ) -> None:
        self.state = state
        self.limits = limits or UploadLimiter.from_config(state.config)

    async def Join(self, request: contributor_pb2.JoinRequest, context: Any) -> Any:
        """Join: an enrollment token for a contributor id and credential; the one unauthenticated
        RPC. Runs :func:`~moerge.coordinator.rpc.contributor_handler.join` off the event loop."""
        return await _serve(
            contributor_handler.join, request, self.state, context, authenticated=False
        )

    async def GetBaseModel(self, request: Any, context: Any) -> contributor_pb2.BaseModelInfo:
        """GetBaseModel: the base model, revision and LoRA limits experts must match. Runs
        :func:`~moerge.coordinator.rpc.contributor_handler.get_base_model` off the event loop."""
        return await _serve(contributor_handler.get_base_model, request, self.state, context)

    async def GetUploadStatus(self, request: Any, context: Any) -> contributor_pb2.UploadStatus:
        """GetUploadStatus: how far one of the caller's uploads got. Runs
        :func:`~moerge.coordinator.rpc.contributor_handler.get_upload_status` off the event loop."""
        return await _serve(contributor_handler.get_upload_status, request, self.state, context)

    async def ListMyExperts(self, request: Any, context: Any) -> Any:
        """ListMyExperts: every expert the caller registered. Runs
        :func:`~moerge.coordinator.rpc.contributor_handler.list_my_experts` off the event loop."""
        return await _serve(contributor_handler.list_my_experts, request, self.state, context)

    async def RegisterNodeKey(self, request: Any, context: Any) -> Any:
        """RegisterNodeKey: record the caller's SuperNode key and admit it to the SuperLink. Runs
        :func:`~moerge.coordinator.rpc.contributor_handler.register_node_key` off the event loop."""
        return await _serve(contributor_handler.register_node_key, request, self.state, context)

    async def StartObjectUpload(self, request: Any, context: Any) -> Any:
        """StartObjectUpload: presigned URLs for the parts of a direct upload, charged to the
        caller's upload limits. Runs
        :func:`~moerge.coordinator.rpc.contributor_handler.start_object_upload` off the event
        loop."""
        limits = self.limits if self.limits.enabled else None
        handler = functools.partial(contributor_handler.start_object_upload, limits=limits)
        return await _serve(handler, request, self.state, context)

    async def CompleteObjectUpload(self, request: Any, context: Any) -> Any:
        """CompleteObjectUpload: check the parts in the object store and register the expert. Runs
        :func:`~moerge.coordinator.rpc.contributor_handler.complete_object_upload` off the event
        loop."""
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
        """Predict: route, run the chosen experts and aggregate their outputs."""
        return await self._serve(inference_handler.predict, request, context)

    async def Route(self, request: inference_pb2.RouteRequest, context: Any) -> Any:
        """Route: the routing decision alone, no expert runs."""
        return await self._serve(inference_handler.route, request, context)

    async def Generate(self, request: inference_pb2.GenerateRequest, context: Any) -> Any:
        """Generate: stream a generation's events; a failure before or during the stream aborts with
        its status."""
        try:
            stream = inference_handler.generate(request, self.state, current_principal())
            async with contextlib.aclosing(stream) as messages:
                async for message in messages:
                    yield message
        except Exception as exc:
            code, detail = status_for(exc)
            await context.abort(code, detail)

    async def Compose(self, request: inference_pb2.ComposeRequest, context: Any) -> Any:
        """Compose: stream a few-shot composition search's progress, then the stored composition."""
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
        """ListCompositions: the stored compositions (every version, or one name's)."""
        return await self._serve(composition_handler.list_compositions, request, context)

    async def ListModels(self, request: inference_pb2.ListModelsRequest, context: Any) -> Any:
        """ListModels: the experts, routing methods and compositions a request may name."""
        return await self._serve(models_handler.list_models, request, context)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """AdminService: the operator's RPCs (experts, routers, enrollment tokens, API keys,
    contributors, audit log); each hands its request to
    :mod:`~moerge.coordinator.rpc.admin_handler`."""

    def __init__(self, state: CoordinatorState) -> None:
        self.state = state

    async def ListExperts(self, request: Any, context: Any) -> admin_pb2.ListExpertsResponse:
        """ListExperts: a page of experts, optionally of one state. Runs
        :func:`~moerge.coordinator.rpc.admin_handler.list_experts` off the event loop."""
        return await _serve(admin_handler.list_experts, request, self.state, context)

    async def GetExpert(self, request: Any, context: Any) -> common_pb2.Expert:
        """GetExpert: one expert. Runs :func:`~moerge.coordinator.rpc.admin_handler.get_expert` off
        the event loop."""
        return await _serve(admin_handler.get_expert, request, self.state, context)

    async def SetExpertState(self, request: Any, context: Any) -> common_pb2.Expert:
        """SetExpertState: activate, quarantine or retire an expert, with a reason. Runs
        :func:`~moerge.coordinator.rpc.admin_handler.set_expert_state` off the event loop."""
        return await _serve(admin_handler.set_expert_state, request, self.state, context)

    async def DeleteExpert(self, request: Any, context: Any) -> admin_pb2.DeleteExpertResponse:
        """DeleteExpert: remove the expert and the blobs nothing else references. Runs
        :func:`~moerge.coordinator.rpc.admin_handler.delete_expert` off the event loop."""
        return await _serve(admin_handler.delete_expert, request, self.state, context)

    async def ListRouterVersions(self, request: Any, context: Any) -> Any:
        """ListRouterVersions: a page of router versions. Runs
        :func:`~moerge.coordinator.rpc.admin_handler.list_router_versions` off the event loop."""
        return await _serve(admin_handler.list_router_versions, request, self.state, context)

    async def TrainRouter(self, request: Any, context: Any) -> admin_pb2.RouterVersion:
        """TrainRouter: fit a router version now (and activate it unless told not to). Runs
        :func:`~moerge.coordinator.rpc.admin_handler.train_router` off the event loop."""
        return await _serve(admin_handler.train_router, request, self.state, context)

    async def ActivateRouterVersion(self, request: Any, context: Any) -> admin_pb2.RouterVersion:
        """ActivateRouterVersion: serve an earlier trained version again (roll back). Runs
        :func:`~moerge.coordinator.rpc.admin_handler.activate_router_version` off the event loop."""
        return await _serve(admin_handler.activate_router_version, request, self.state, context)

    async def CreateEnrollmentToken(self, request: Any, context: Any) -> Any:
        """CreateEnrollmentToken: a token a contributor joins with. Runs
        :func:`~moerge.coordinator.rpc.admin_handler.create_enrollment_token` off the event loop."""
        return await _serve(admin_handler.create_enrollment_token, request, self.state, context)

    async def ListEnrollmentTokens(self, request: Any, context: Any) -> Any:
        """ListEnrollmentTokens: a page of enrollment tokens (never their secrets). Runs
        :func:`~moerge.coordinator.rpc.admin_handler.list_enrollment_tokens` off the event loop."""
        return await _serve(admin_handler.list_enrollment_tokens, request, self.state, context)

    async def RevokeEnrollmentToken(self, request: Any, context: Any) -> Any:
        """RevokeEnrollmentToken: stop a token from admitting anyone else. Runs
        :func:`~moerge.coordinator.rpc.admin_handler.revoke_enrollment_token` off the event loop."""
        return await _serve(admin_handler.revoke_enrollment_token, request, self.state, context)

    async def CreateApiKey(self, request: Any, context: Any) -> Any:
        """CreateApiKey: a user-role key for the inference API, with an optional rate limit and
        lifetime. Runs :func:`~moerge.coordinator.rpc.admin_handler.create_api_key` off the event
        loop."""
        return await _serve(admin_handler.create_api_key, request, self.state, context)

    async def ListApiKeys(self, request: Any, context: Any) -> Any:
        """ListApiKeys: a page of API keys (never their secrets). Runs
        :func:`~moerge.coordinator.rpc.admin_handler.list_api_keys` off the event loop."""
        return await _serve(admin_handler.list_api_keys, request, self.state, context)

    async def RevokeApiKey(self, request: Any, context: Any) -> admin_pb2.ApiKey:
        """RevokeApiKey: the key stops working at once. Runs
        :func:`~moerge.coordinator.rpc.admin_handler.revoke_api_key` off the event loop."""
        return await _serve(admin_handler.revoke_api_key, request, self.state, context)

    async def ListContributors(self, request: Any, context: Any) -> Any:
        """ListContributors: a page of contributors with their expert counts. Runs
        :func:`~moerge.coordinator.rpc.admin_handler.list_contributors` off the event loop."""
        return await _serve(admin_handler.list_contributors, request, self.state, context)

    async def RevokeContributor(self, request: Any, context: Any) -> admin_pb2.Contributor:
        """RevokeContributor: lock a contributor out and unregister its SuperNodes. Runs
        :func:`~moerge.coordinator.rpc.admin_handler.revoke_contributor` off the event loop."""
        return await _serve(admin_handler.revoke_contributor, request, self.state, context)

    async def ListAuditLog(self, request: Any, context: Any) -> admin_pb2.ListAuditLogResponse:
        """ListAuditLog: a page of audit entries, newest first, optionally of one action. Runs
        :func:`~moerge.coordinator.rpc.admin_handler.list_audit_log` off the event loop."""
        return await _serve(admin_handler.list_audit_log, request, self.state, context)
