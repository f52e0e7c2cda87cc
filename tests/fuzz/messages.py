"""Hostile request messages for every RPC: hypothesis strategies and a seeded mutator.

Strategies are derived from each request's protobuf descriptor, so a field added to a
``.proto`` is fuzzed without touching this file; :data:`HINTS` biases some fields towards
values that get past the first check (real ids, method names, the four expert file names).
"""

from __future__ import annotations

import base64
import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from moerge.expert_format import EXPERT_FILES
from moerge.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    contributor_pb2,
    contributor_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

#: Strings that have broken servers before: traversal, NUL, SQL and format metacharacters,
#: bidi and zero-width characters, very long and almost-valid identifiers.
EVIL_STRINGS: tuple[str, ...] = (
    "",
    " ",
    ".",
    "..",
    "../../etc/passwd",
    "..\\..\\windows",
    "/etc/passwd",
    "/",
    "a\x00b",
    "\x00",
    "name\n",
    "bad\x07name",
    "\r\n",
    "'; DROP TABLE experts; --",
    '" OR 1=1 --',
    "' OR ''='",
    "%",
    "_",
    "%%%",
    "%s%n%x",
    "{0}",
    "${jndi:ldap://x}",
    "<script>alert(1)</script>",
    "\u202egnp.exe",
    "zero\u200bwidth",
    "\ufeff",
    "\u2028",
    "名前",
    "😀" * 40,
    "\U0010ffff",
    "a" * 129,
    "x" * 5000,
    "y" * 70_000,
    "0" * 32,
    "f" * 32,
    "0" * 31,
    "A" * 32,
    "g" * 64,
    "0" * 64,
    "-1",
    "NaN",
    "1e309",
    "null",
    "{}",
    "[]",
    '{"a":',
    "[1]",
    '{"k": NaN}',
    '{"k": 1e999}',
    '{"top_k": -1}',
    '{"temperature": "hot"}',
    '{"__class__": {}}',
    "centroid",
    "arrow",
    "phatgoose",
    "lda",
    "qda",
    "mlp",
    "mga_x_y",
    "mgc_abc_def",
    "mge_nope",
)
EVIL_INTS: tuple[int, ...] = (0, 1, -1, 2, 7, 99, 1000, 1001, 2**31 - 1, -(2**31))
EVIL_INT64S: tuple[int, ...] = (*EVIL_INTS, 2**63 - 1, -(2**63), 2**40, 10**12)
EVIL_FLOATS: tuple[float, ...] = (0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), -float("inf"))
HEX = "0123456789abcdef"

INT32 = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32}
INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64}


def evil_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(EVIL_STRINGS),
        st.text(max_size=40),
        st.text(alphabet=string.printable, max_size=80),
        st.text(alphabet=HEX, min_size=30, max_size=66),
        st.lists(st.sampled_from(EVIL_STRINGS[:40]), min_size=2, max_size=3).map("".join),
    )


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return evil_text()
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.one_of(st.sampled_from(EVIL_FLOATS), st.floats(width=32))
    if field.type in INT32 or field.type == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from(EVIL_INTS), st.integers(-(2**31), 2**31 - 1))
    if field.type in INT64:
        return st.one_of(st.sampled_from(EVIL_INT64S), st.integers(-(2**63), 2**63 - 1))
    raise NotImplementedError(field.full_name)


#: Field -> strategy factory taking the known-ids context (see :class:`Context`).
HINTS: dict[str, Callable[[Context], st.SearchStrategy[Any]]] = {}


@dataclass
class Context:
    """Real values on the server under test, so some cases pass the first checks."""

    expert_id: str
    contributor_id: str

    def ids(self) -> st.SearchStrategy[str]:
        return st.one_of(st.just(self.expert_id), st.just(self.contributor_id), evil_text())


def _hint(*names: str) -> Callable[[Callable[[Context], Any]], Callable[[Context], Any]]:
    def register(factory: Callable[[Context], Any]) -> Callable[[Context], Any]:
        for name in names:
            HINTS[name] = factory
        return factory

    return register


@_hint("moerge.v1.GetExpertRequest.expert_id", "moerge.v1.SetExpertStateRequest.expert_id")
def _expert_ids(ctx: Context) -> st.SearchStrategy[str]:
    return ctx.ids()


@_hint("moerge.v1.PredictRequest.expert_ids", "moerge.v1.RouteRequest.expert_ids")
def _expert_id_list(ctx: Context) -> st.SearchStrategy[list[str]]:
    return st.lists(ctx.ids(), max_size=4)


@_hint("moerge.v1.PredictRequest.inputs", "moerge.v1.RouteRequest.inputs")
def _inputs(ctx: Context) -> st.SearchStrategy[list[str]]:
    words = st.sampled_from(["good film", "bad movie", "the team won", ""])
    return st.one_of(
        st.lists(st.one_of(words, evil_text()), max_size=4),
        st.integers(257, 300).map(lambda n: ["good"] * n),  # over max_batch_inputs
        st.just(["good " * 5000]),  # over max_input_chars
    )


@_hint("moerge.v1.UploadFile.name")
def _file_names(ctx: Context) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(EXPERT_FILES), evil_text())


@_hint("moerge.v1.UploadFile.sha256")
def _digests(ctx: Context) -> st.SearchStrategy[str]:
    return st.one_of(st.text(alphabet=HEX, min_size=64, max_size=64), evil_text())


@_hint("moerge.v1.UploadFile.size")
def _sizes(ctx: Context) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 64), st.sampled_from(EVIL_INT64S))


@_hint("moerge.v1.UploadManifest.upload_id", "moerge.v1.GetUploadStatusRequest.upload_id")
def _upload_ids(ctx: Context) -> st.SearchStrategy[str]:
    return st.one_of(st.text(alphabet=HEX, min_size=8, max_size=32), evil_text())


#: The listing each request's page token belongs to, and its key's kind.
PAGE_TOKEN_FIELDS = {
    "moerge.v1.ListExpertsRequest.page_token": "experts",
    "moerge.v1.ListContributorsRequest.page_token": "contributors",
    "moerge.v1.ListRouterVersionsRequest.page_token": "router_versions",
    "moerge.v1.ListAuditLogRequest.page_token": "audit",
}


def crafted_page_token(field: str, rng: random.Random) -> str:
    """A token shaped like a real one for ``field`` (base64 JSON of its listing and key).

    Only a token that decodes gets its key into the query, where PostgreSQL checks its type.
    """
    listing = PAGE_TOKEN_FIELDS[field]
    if listing in ("router_versions", "audit"):
        key = [listing, rng.choice([2**31, *EVIL_INT64S[-4:], *EVIL_INTS])]
    else:
        when = rng.choice(["2026-01-01T00:00:00+00:00", "0001-01-01T00:00:00+00:00"])
        key = [listing, when, rng.choice(EVIL_STRINGS[:40])]
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode("ascii").rstrip("=")


def _page_tokens(field: str) -> Callable[[Context], st.SearchStrategy[str]]:
    def strategy(ctx: Context) -> st.SearchStrategy[str]:
        crafted = st.randoms(use_true_random=False).map(lambda r: crafted_page_token(field, r))
        return st.one_of(crafted, evil_text())

    return strategy


for _field in PAGE_TOKEN_FIELDS:
    HINTS[_field] = _page_tokens(_field)


@_hint("moerge.v1.UploadManifest.files")
def _manifest_files(ctx: Context) -> st.SearchStrategy[list[Any]]:
    one = message_strategy(contributor_pb2.UploadFile.DESCRIPTOR, ctx)
    return st.lists(one, min_size=0, max_size=6)


def message_strategy(descriptor: Descriptor, ctx: Context) -> st.SearchStrategy[Message]:
    """Any message of this type, every field drawn from its hint or a hostile default."""
    cls = _class_of(descriptor)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        hint = HINTS.get(field.full_name)
        if hint is not None:
            fields[field.name] = hint(ctx)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.full_name.startswith("google.protobuf"):
                continue
            inner = message_strategy(field.message_type, ctx)
            fields[field.name] = st.lists(inner, max_size=3) if _repeated(field) else inner
        elif _repeated(field):
            fields[field.name] = st.lists(_scalar(field), max_size=4)
        else:
            fields[field.name] = _scalar(field)
    optional = {name: s for name, s in fields.items()}
    if descriptor.oneofs:  # a oneof gets one member (or none), not all of them
        members = [f.name for f in descriptor.oneofs[0].fields]
        chosen = st.sampled_from([None, *members])
        return st.fixed_dictionaries({}, optional=optional).flatmap(
            lambda kw: chosen.map(lambda c: cls(**{k: v for k, v in kw.items() if k == c}))
        )
    return st.fixed_dictionaries({}, optional=optional).map(lambda kw: cls(**kw))


def _repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated


_CLASSES: dict[str, type[Message]] = {}
for _module in (admin_pb2, contributor_pb2, inference_pb2):
    for _name in _module.DESCRIPTOR.message_types_by_name:
        _CLASSES[f"moerge.v1.{_name}"] = getattr(_module, _name)


def _class_of(descriptor: Descriptor) -> type[Message]:
    return _CLASSES[descriptor.full_name]


# -- the RPCs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    """One RPC: where it lives, who calls it, and whether success may change the store."""

    service: str
    method: str
    request: type[Message]
    role: str  # "admin", "contributor" or "none"
    mutates: bool = False
    streaming: bool = False

    @property
    def path(self) -> str:
        return f"/moerge.v1.{self.service}/{self.method}"


RPCS: tuple[Rpc, ...] = (
    Rpc("ContributorService", "Join", contributor_pb2.JoinRequest, "none", mutates=True),
    Rpc("ContributorService", "GetBaseModel", contributor_pb2.GetBaseModelRequest, "contributor"),
    Rpc(
        "ContributorService",
        "UploadExpert",
        contributor_pb2.UploadExpertRequest,
        "contributor",
        mutates=True,
        streaming=True,
    ),
    Rpc(
        "ContributorService",
        "GetUploadStatus",
        contributor_pb2.GetUploadStatusRequest,
        "contributor",
    ),
    Rpc("ContributorService", "ListMyExperts", contributor_pb2.ListMyExpertsRequest, "contributor"),
    Rpc(
        "ContributorService",
        "RegisterNodeKey",
        contributor_pb2.RegisterNodeKeyRequest,
        "contributor",
        mutates=True,
    ),
    Rpc(
        "ContributorService",
        "StartObjectUpload",
        contributor_pb2.ObjectUploadRequest,
        "contributor",
        mutates=True,
    ),
    Rpc(
        "ContributorService",
        "CompleteObjectUpload",
        contributor_pb2.ObjectUploadRequest,
        "contributor",
        mutates=True,
    ),
    Rpc("InferenceService", "Predict", inference_pb2.PredictRequest, "contributor"),
    Rpc("InferenceService", "Route", inference_pb2.RouteRequest, "contributor"),
    Rpc("AdminService", "ListExperts", admin_pb2.ListExpertsRequest, "admin"),
    Rpc("AdminService", "GetExpert", admin_pb2.GetExpertRequest, "admin"),
    Rpc("AdminService", "SetExpertState", admin_pb2.SetExpertStateRequest, "admin", mutates=True),
    Rpc("AdminService", "DeleteExpert", admin_pb2.DeleteExpertRequest, "admin", mutates=True),
    Rpc("AdminService", "ListRouterVersions", admin_pb2.ListRouterVersionsRequest, "admin"),
    Rpc("AdminService", "TrainRouter", admin_pb2.TrainRouterRequest, "admin", mutates=True),
    Rpc(
        "AdminService",
        "ActivateRouterVersion",
        admin_pb2.ActivateRouterVersionRequest,
        "admin",
        mutates=True,
    ),
    Rpc(
        "AdminService",
        "CreateEnrollmentToken",
        admin_pb2.CreateEnrollmentTokenRequest,
        "admin",
        mutates=True,
    ),
    Rpc("AdminService", "ListContributors", admin_pb2.ListContributorsRequest, "admin"),
    Rpc(
        "AdminService",
        "RevokeContributor",
        admin_pb2.RevokeContributorRequest,
        "admin",
        mutates=True,
    ),
    Rpc("AdminService", "ListAuditLog", admin_pb2.ListAuditLogRequest, "admin"),
)
STUBS = {
    "ContributorService": contributor_pb2_grpc.ContributorServiceStub,
    "InferenceService": inference_pb2_grpc.InferenceServiceStub,
    "AdminService": admin_pb2_grpc.AdminServiceStub,
}


def request_strategy(rpc: Rpc, ctx: Context) -> st.SearchStrategy[Any]:
    """One request, or for the upload stream a list of 0-4 messages."""
    one = message_strategy(rpc.request.DESCRIPTOR, ctx)
    return st.lists(one, max_size=4) if rpc.streaming else one


# -- the mutator ------------------------------------------------------------------------------


def _evil_value(field: FieldDescriptor, rng: random.Random) -> Any:
    if field.full_name in PAGE_TOKEN_FIELDS and rng.random() < 0.5:
        return crafted_page_token(field.full_name, rng)
    if field.type == FieldDescriptor.TYPE_STRING:
        value = rng.choice(EVIL_STRINGS)
        return value if rng.random() < 0.8 else value + rng.choice(EVIL_STRINGS)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 7, 4096]))
    if field.type == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice(EVIL_FLOATS)
    if field.type in INT64:
        return rng.choice(EVIL_INT64S)
    return rng.choice(EVIL_INTS)


def mutate_fields(message: Message, rng: random.Random, changes: int = 1) -> Message:
    """Set a few (possibly nested) fields of a copy of ``message`` to hostile values."""
    out = type(message)()
    out.CopyFrom(message)
    for _ in range(changes):
        target = out
        while True:
            fields = [
                f
                for f in target.DESCRIPTOR.fields
                if not (f.message_type and f.message_type.full_name.startswith("google"))
            ]
            if not fields:
                break
            field = rng.choice(fields)
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if _repeated(field):
                    items = getattr(target, field.name)
                    if not items or rng.random() < 0.2:
                        items.add()
                        if rng.random() < 0.3:
                            break
                    target = rng.choice(items)
                else:
                    target = getattr(target, field.name)
                continue
            if _repeated(field):
                values = getattr(target, field.name)
                if values and rng.random() < 0.3:
                    del values[rng.randrange(len(values))]
                else:
                    values.append(_evil_value(field, rng))
            elif rng.random() < 0.15:
                target.ClearField(field.name)
            else:
                setattr(target, field.name, _evil_value(field, rng))
            break
    return out


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Wire-level damage: flipped bits, truncation, inserted, duplicated or huge varints."""
    buf = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0 and buf:
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif kind == 1 and buf:
        del buf[rng.randrange(len(buf)) :]
    elif kind == 2:
        at = rng.randrange(len(buf) + 1)
        buf[at:at] = rng.randbytes(rng.randint(1, 12))
    elif kind == 3 and buf:
        at, end = sorted(rng.sample(range(len(buf) + 1), 2))
        buf += buf[at:end]
    elif kind == 4:
        # a field with a random tag and a maximal varint, or a length prefix past the end
        tag = rng.randint(1, 40) << 3 | rng.choice([0, 2])
        buf += bytes([tag & 0x7F | 0x80, tag >> 7]) if tag > 127 else bytes([tag])
        buf += b"\xff" * 9 + b"\x01"
    else:
        buf = bytearray(rng.randbytes(rng.randint(0, 32)))
    return bytes(buf)
