"""ContributorService logic: join, describe the base model, receive uploads, list own experts.

Plain functions over :class:`~moerge.coordinator.state.CoordinatorState`; no grpc imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moerge.coordinator.interceptors.rate_limit import UploadLimiter
from moerge.coordinator.rpc import convert
from moerge.coordinator.services.node_keys import admit_node_keys
from moerge.coordinator.state import CoordinatorState
from moerge.coordinator.uploads.receiver import UPLOAD_ID, Manifest, ManifestFile
from moerge.refusals import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from moerge.storage.records import ExpertInfo, Principal, UploadInfo
from moerge.v1 import contributor_pb2

if TYPE_CHECKING:
    from moerge.coordinator.uploads.object_uploads import ObjectUploads


def join(request: contributor_pb2.JoinRequest, state: CoordinatorState) -> Any:
    """Exchange an enrollment token for a contributor id and a credential (shown once)."""
    info, credential = state.registry.join(request.enrollment_token, request.name)
    return contributor_pb2.JoinResponse(contributor_id=info.id, credential=credential)


def get_base_model(
    request: contributor_pb2.GetBaseModelRequest, state: CoordinatorState, principal: Principal
) -> contributor_pb2.BaseModelInfo:
    """The base model's id, revision and LoRA limits, and this coordinator's upload sizes."""
    spec = state.spec
    return contributor_pb2.BaseModelInfo(
        base_model_id=spec.model_id,
        revision=spec.revision,
        allowed_target_modules=list(spec.allowed_targets),
        max_lora_rank=spec.max_lora_rank,
        hidden_size=spec.hidden_size,
        task_type=spec.task_type,
        max_upload_bytes=state.config.max_upload_bytes,
        chunk_size=state.config.chunk_size,
        object_part_size=state.objects.part_size if state.objects is not None else 0,
    )


def get_upload_status(
    request: contributor_pb2.GetUploadStatusRequest, state: CoordinatorState, principal: Principal
) -> contributor_pb2.UploadStatus:
    """An upload's progress: a direct upload's parts in the object store, else the bytes staged
    here."""
    _check_upload_id(request.upload_id)
    if state.objects is not None:  # a direct upload's bytes are in the store, not staged here
        info = state.objects.progress(_contributor_id(principal), request.upload_id)
        if info is not None:
            return convert.upload_status(info)
    return convert.upload_status(
        state.uploads.status(_contributor_id(principal), request.upload_id)
    )


def list_my_experts(
    request: contributor_pb2.ListMyExpertsRequest, state: CoordinatorState, principal: Principal
) -> contributor_pb2.ListMyExpertsResponse:
    """All of the caller's experts, every page of the registry's listing gathered."""
    experts: list[ExpertInfo] = []
    token = None
    while True:
        page = state.registry.list_experts(
            page_size=500, page_token=token, contributor_id=_contributor_id(principal)
        )
        experts.extend(page.items)
        token = page.next_page_token
        if not token:
            break
    return contributor_pb2.ListMyExpertsResponse(experts=[convert.expert(e) for e in experts])


def register_node_key(
    request: contributor_pb2.RegisterNodeKeyRequest, state: CoordinatorState, principal: Principal
) -> contributor_pb2.RegisterNodeKeyResponse:
    """Record the caller's SuperNode key and have the SuperLink admit it (docs/federated.md)."""
    info = state.registry.register_node_key(
        convert.actor_of(principal), _contributor_id(principal), request.public_key
    )
    node_id = admit_node_keys(state).get(info.public_key, 0)
    return contributor_pb2.RegisterNodeKeyResponse(
        node_key_id=info.id, admitted=bool(node_id), flower_node_id=node_id
    )


def open_upload(
    state: CoordinatorState, principal: Principal, limits: UploadLimiter | None, manifest: Manifest
) -> UploadInfo:
    """Begin or resume a chunked upload: count new ids against the rate limit."""
    contributor_id = _contributor_id(principal)
    if limits is not None and limits.uploads_per_hour:
        manifest.check(state.config.max_upload_bytes)  # count only valid ones
        if _is_new(state, contributor_id, manifest.upload_id):
            limits.start_upload(contributor_id)
    return state.uploads.start(contributor_id, manifest)


def start_object_upload(
    request: contributor_pb2.ObjectUploadRequest,
    state: CoordinatorState,
    principal: Principal,
    limits: UploadLimiter | None = None,
) -> contributor_pb2.ObjectUploadPlan:
    """Open or resume a direct upload: a presigned URL for every part not in the store yet.

    The hourly byte quota is charged for the parts handed out (again if they are handed out
    again); ``upload_bytes_per_second`` cannot pace bytes that do not pass through here.
    """
    from moerge.storage.blobstore_s3 import checksum_header  # boto3: only with an S3 store

    contributor_id = _contributor_id(principal)
    objects = _objects(state)
    manifest = _manifest(request.manifest)
    if limits is not None and limits.uploads_per_hour:
        manifest.check(state.config.max_upload_bytes)
        if _is_new(state, contributor_id, manifest.upload_id):
            limits.start_upload(contributor_id)
    info, targets = objects.plan(contributor_id, manifest, _part_digests(request))
    missing = sum(t.size for t in targets if not t.uploaded)
    if limits is not None and limits.bytes_per_hour and missing:
        limits.receive(contributor_id, missing)
    return contributor_pb2.ObjectUploadPlan(
        status=convert.upload_status(info),
        part_size=objects.part_size,
        expires_in_seconds=objects.url_seconds,
        parts=[
            contributor_pb2.UploadPart(
                file=t.file,
                part_number=t.part_number,
                offset=t.offset,
                size=t.size,
                uploaded=t.uploaded,
                url=t.url,
                checksum_sha256="" if t.uploaded else checksum_header(t.sha256),
            )
            for t in targets
        ],
    )


def complete_object_upload(
    request: contributor_pb2.ObjectUploadRequest, state: CoordinatorState, principal: Principal
) -> contributor_pb2.UploadExpertResponse:
    """Commit a direct upload whose parts are all in the object store."""
    manifest = _manifest(request.manifest)
    info, created = _objects(state).complete(
        convert.actor_of(principal), _contributor_id(principal), manifest, _part_digests(request)
    )
    return contributor_pb2.UploadExpertResponse(
        upload_id=manifest.upload_id, expert=convert.expert(info), created=created
    )


def _contributor_id(principal: Principal) -> str:
    """The caller's contributor id. The auth interceptor lets only contributors call this
    service; an admin's principal (no contributor id) reaching a handler would otherwise list
    every expert or upload under no one."""
    if principal.contributor_id is None:
        raise PermissionDenied("only a contributor may call ContributorService")
    return principal.contributor_id


def _objects(state: CoordinatorState) -> ObjectUploads:
    if state.objects is None:
        raise FailedPrecondition(
            "this coordinator takes no direct uploads (no object store, or object_part_bytes "
            "is 0); send UploadExpert chunks"
        )
    return state.objects


def _part_digests(request: contributor_pb2.ObjectUploadRequest) -> dict[str, list[str]]:
    return {f.name: list(f.part_sha256) for f in request.files}


class UploadSession:
    """One UploadExpert stream: a manifest, then chunks at increasing offsets."""

    def __init__(
        self, state: CoordinatorState, principal: Principal, limits: UploadLimiter | None = None
    ) -> None:
        self.state = state
        self.principal = principal
        self.contributor_id = _contributor_id(principal)
        self.limits = limits
        self.manifest: Manifest | None = None
        self.offset = 0

    def receive(self, message: contributor_pb2.UploadExpertRequest) -> float:
        """Handle one message; return how long to pause before the next (upload pacing, s)."""
        kind = message.WhichOneof("kind")
        delay = 0.0
        if kind == "manifest":
            if self.manifest is not None:
                raise InvalidArgument("manifest", "sent twice in one stream")
            self.manifest = _manifest(message.manifest)
            info = open_upload(self.state, self.principal, self.limits, self.manifest)
            self.offset = info.received_bytes
        elif kind == "chunk":
            if self.manifest is None:
                raise InvalidArgument("manifest", "the first message must be a manifest")
            if self.limits is not None:
                delay = self.limits.receive(self.contributor_id, len(message.chunk.data))
            self.offset = self.state.uploads.append(
                self.contributor_id,
                self.manifest.upload_id,
                message.chunk.offset,
                message.chunk.data,
            )
        else:
            raise InvalidArgument("kind", "empty UploadExpertRequest")
        return delay

    def finish(self) -> contributor_pb2.UploadExpertResponse:
        """Commit the streamed upload once its last byte is in; a stream without a manifest is
        refused."""
        if self.manifest is None:
            raise InvalidArgument("manifest", "the stream held no manifest")
        info, created = self.state.uploads.finish(
            convert.actor_of(self.principal),
            self.contributor_id,
            self.manifest.upload_id,
        )
        return contributor_pb2.UploadExpertResponse(
            upload_id=self.manifest.upload_id, expert=convert.expert(info), created=created
        )


def _is_new(state: CoordinatorState, contributor_id: str, upload_id: str) -> bool:
    try:
        state.registry.get_upload(contributor_id, upload_id)
    except NotFound:
        return True
    return False


def _check_upload_id(upload_id: str) -> None:
    if not UPLOAD_ID.match(upload_id):
        raise InvalidArgument("upload_id", "must be 8-64 characters of [A-Za-z0-9_-]")


def _manifest(message: contributor_pb2.UploadManifest) -> Manifest:
    return Manifest(
        upload_id=message.upload_id,
        expert_name=message.expert_name,
        task_name=message.task_name,
        task_description=message.task_description,
        files=tuple(ManifestFile(f.name, f.size, f.sha256) for f in message.files),
    )
