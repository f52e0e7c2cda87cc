"""One test per defect the fuzzers found, named after the behaviour that is now guaranteed."""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from moerge.expert_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    STATISTICS_META,
    STATISTICS_TENSORS,
)
from moerge.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    contributor_pb2,
    contributor_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)
from tests.fuzz.conftest import FuzzServer
from tests.fuzz.files import Upload, load_valid
from tests.fuzz.oracle import check_alive, only_upload_bookkeeping
from tests.fuzz.test_upload_fuzz import send_over_grpc


def _edited(server: FuzzServer, name: str, edit) -> Upload:
    valid = load_valid(server.expert_dir)
    raw = json.loads(dict(valid.files)[name])
    data = edit(raw)
    data = data if isinstance(data, bytes) else json.dumps(data).encode()
    files = tuple((n, data if n == name else d) for n, d in valid.files)
    return replace(valid, files=files, label=f"edited {name}")


def _refused_leaving_nothing(server: FuzzServer, upload: Upload) -> str:
    before = server.snapshot()
    refusal = send_over_grpc(server, upload)
    after = server.snapshot()
    check_alive(server.channel)
    assert refusal is not None, "the upload was accepted"
    code, message = refusal
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, message)
    assert only_upload_bookkeeping(before, after), before.changes(after)
    assert after.blobs == before.blobs
    return message


def test_router_params_that_do_not_fit_the_method_are_refused_before_a_version_is_recorded(
    fuzz_server: FuzzServer,
) -> None:
    before = fuzz_server.snapshot()
    with pytest.raises(grpc.RpcError) as err:
        admin_pb2_grpc.AdminServiceStub(fuzz_server.channel).TrainRouter(
            admin_pb2.TrainRouterRequest(method="centroid", rounds=1),
            metadata=fuzz_server.admin,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rounds" in err.value.details()
    assert fuzz_server.snapshot() == before


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/moerge.v1.InferenceService/Predict", b"\n\tgood fil"),  # a string cut short
        ("/moerge.v1.AdminService/ListExperts", b"\x08" + b"\xff" * 10),  # a varint too long
    ],
)
def test_request_bytes_that_do_not_parse_are_invalid_argument(
    fuzz_server: FuzzServer, path: str, payload: bytes
) -> None:
    metadata = fuzz_server.admin if "Admin" in path else fuzz_server.contributor
    with pytest.raises(grpc.RpcError) as err:
        fuzz_server.channel.unary_unary(path)(payload, metadata=metadata, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid moerge.v1." in err.value.details()
    check_alive(fuzz_server.channel)


def test_an_upload_stream_with_a_message_that_does_not_parse_is_invalid_argument(
    fuzz_server: FuzzServer,
) -> None:
    good = contributor_pb2.UploadExpertRequest(
        manifest=contributor_pb2.UploadManifest(upload_id="x")
    ).SerializeToString()
    with pytest.raises(grpc.RpcError) as err:
        fuzz_server.channel.stream_unary("/moerge.v1.ContributorService/UploadExpert")(
            iter([b"\x0a\x05ab", good]), metadata=fuzz_server.contributor, timeout=30
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    check_alive(fuzz_server.channel)
    # and a well-formed request on the same server still works
    response = fuzz_server.channel.unary_unary(
        "/moerge.v1.InferenceService/Route",
        request_serializer=inference_pb2.RouteRequest.SerializeToString,
        response_deserializer=inference_pb2.RouteResponse.FromString,
    )(inference_pb2.RouteRequest(inputs=["good film"]), metadata=fuzz_server.contributor)
    assert len(response.decisions) == 1


def test_non_string_target_modules_are_refused_as_invalid_argument(
    fuzz_server: FuzzServer,
) -> None:
    upload = _edited(fuzz_server, ADAPTER_CONFIG, lambda c: {**c, "target_modules": [None, 3]})
    assert "target_modules" in _refused_leaving_nothing(fuzz_server, upload)


def test_an_example_count_beyond_the_database_column_is_refused_before_any_blob_is_stored(
    fuzz_server: FuzzServer,
) -> None:
    upload = _edited(fuzz_server, STATISTICS_META, lambda m: {**m, "example_count": 2**70})
    assert "example_count" in _refused_leaving_nothing(fuzz_server, upload)


@pytest.mark.parametrize(
    "labels", [["neg\x00", "pos"], ["a" * 300, "pos"], [f"l{i}" for i in range(5000)]]
)
def test_label_names_the_registry_would_refuse_are_refused_before_any_blob_is_stored(
    fuzz_server: FuzzServer, labels: list[str]
) -> None:
    def edit(meta: dict) -> dict:
        return {**meta, "label_names": labels, "label_counts": [1] * len(labels)}

    upload = _edited(fuzz_server, STATISTICS_META, edit)
    assert "label_names" in _refused_leaving_nothing(fuzz_server, upload)


@pytest.mark.parametrize("name", [ADAPTER_CONFIG, STATISTICS_META])
def test_deeply_nested_json_is_refused_as_invalid_json(fuzz_server: FuzzServer, name: str) -> None:
    upload = _edited(fuzz_server, name, lambda _: b"[" * 100_000 + b"]" * 100_000)
    assert "not valid JSON" in _refused_leaving_nothing(fuzz_server, upload)


@pytest.mark.parametrize("noise_std", [{"embedding.mean": float("nan")}, [1.0], {"m": "x"}])
def test_dp_noise_that_the_registry_cannot_store_is_refused_before_any_blob_is_stored(
    fuzz_server: FuzzServer, noise_std: object
) -> None:
    dp = {"epsilon": 1.0, "delta": 1e-5, "clip_norm": 1.0, "noise_std": noise_std}
    upload = _edited(fuzz_server, STATISTICS_META, lambda m: {**m, "dp": dp})
    assert "dp" in _refused_leaving_nothing(fuzz_server, upload)


def test_a_router_asking_for_more_experts_than_are_active_is_refused_before_a_version_is_recorded(
    fuzz_server: FuzzServer,
) -> None:
    before = fuzz_server.snapshot()
    with pytest.raises(grpc.RpcError) as err:  # one active expert
        admin_pb2_grpc.AdminServiceStub(fuzz_server.channel).TrainRouter(
            admin_pb2.TrainRouterRequest(
                method="phatgoose", params_json='{"top_k": 2}', no_activate=True
            ),
            metadata=fuzz_server.admin,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_k" in err.value.details()
    assert fuzz_server.snapshot() == before


@pytest.mark.parametrize("version", [2**31, 10**12, 2**63 - 1])
def test_router_versions_beyond_the_integer_column_are_invalid_argument(
    fuzz_server: FuzzServer, version: int
) -> None:
    """PostgreSQL's int4 column refused them in the query: INTERNAL (SQLite said NOT_FOUND)."""
    before = fuzz_server.snapshot()
    calls = [
        lambda: admin_pb2_grpc.AdminServiceStub(fuzz_server.channel).ActivateRouterVersion(
            admin_pb2.ActivateRouterVersionRequest(version=version), metadata=fuzz_server.admin
        ),
        lambda: inference_pb2_grpc.InferenceServiceStub(fuzz_server.channel).Route(
            inference_pb2.RouteRequest(inputs=["good film"], router_version=version),
            metadata=fuzz_server.contributor,
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "version" in err.value.details()
    check_alive(fuzz_server.channel)
    assert fuzz_server.snapshot() == before


@pytest.mark.parametrize(
    ("rpc", "key"),
    [
        ("ListAuditLog", ["audit", 2**40]),
        ("ListRouterVersions", ["router_versions", 2**63 - 1]),
        ("ListExperts", ["experts", "2026-01-01T00:00:00+00:00", "a\x00b"]),
        ("ListContributors", ["contributors", "2026-01-01T00:00:00+00:00", "a\x00b"]),
    ],
)
def test_page_tokens_the_database_cannot_compare_are_refused(
    fuzz_server: FuzzServer, rpc: str, key: list
) -> None:
    """A crafted token's key reached the query: on PostgreSQL, INTERNAL (an int past int4, NUL)."""
    token = base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")
    request = getattr(admin_pb2, f"{rpc}Request")(page_token=token)
    with pytest.raises(grpc.RpcError) as err:
        getattr(admin_pb2_grpc.AdminServiceStub(fuzz_server.channel), rpc)(
            request, metadata=fuzz_server.admin
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "page_token" in err.value.details()
    check_alive(fuzz_server.channel)


@pytest.mark.parametrize("name", [ADAPTER_WEIGHTS, STATISTICS_TENSORS])
def test_a_safetensors_header_of_deeply_nested_json_is_refused_and_the_upload_is_failed(
    fuzz_server: FuzzServer, name: str
) -> None:
    """Once a RecursionError: INTERNAL, and the upload stayed ``receiving`` with its bytes."""
    raw = b"[" * 50_000 + b"]" * 50_000
    upload = _replaced(fuzz_server, name, struct.pack("<Q", len(raw)) + raw)
    assert "not a valid safetensors file" in _refused_leaving_nothing(fuzz_server, upload)
    upload_id = upload.manifest().upload_id
    info = fuzz_server.state.registry.get_upload(fuzz_server.contributor_id, upload_id)
    assert info.state == "failed" and "safetensors" in info.error
    staging = Path(fuzz_server.state.config.staging_dir) / fuzz_server.contributor_id
    assert not list(staging.glob(f"{upload_id}.*"))


def test_the_same_content_under_a_new_name_is_not_registered_again(
    fuzz_server: FuzzServer,
) -> None:
    before = fuzz_server.snapshot()
    upload = replace(load_valid(fuzz_server.expert_dir), expert_name="seed-expert-copy")
    response = contributor_pb2_grpc.ContributorServiceStub(fuzz_server.channel).UploadExpert(
        iter(upload.stream()), metadata=fuzz_server.contributor, timeout=60
    )
    assert not response.created
    assert response.expert.expert_id == fuzz_server.expert_id
    assert "experts" not in before.changes(fuzz_server.snapshot())


def _replaced(server: FuzzServer, name: str, data: bytes) -> Upload:
    valid = load_valid(server.expert_dir)
    files = tuple((n, data if n == name else d) for n, d in valid.files)
    return replace(valid, files=files, label=f"replaced {name}")
