"""``/v1/predict`` and ``/v1/route`` on a real classification coordinator (tiny BERT): the same
answers as gRPC, the refusals mapped to HTTP statuses, and roles checked as for gRPC."""

from __future__ import annotations

import grpc
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from moerge.coordinator.http import errors
from moerge.coordinator.http.auth import caller
from moerge.coordinator.interceptors.auth import AuthInterceptor
from moerge.v1 import inference_pb2, inference_pb2_grpc
from tests.coordinator.harness import bearer
from tests.http.conftest import Served

TEXTS = ["the film was great", "the bank stock fell"]
LABELS = {"neg", "pos", "sport", "tech", "money"}


def test_predict_answers_as_grpc_predict_does(classifier: Served) -> None:
    with classifier.client() as http:
        response = http.post("/v1/predict", json={"inputs": TEXTS, "aggregation": "ensemble"})
    assert response.status_code == 200
    body = response.json()
    assert body["routing_method"] == "centroid" and "no router trained yet" in body["note"]
    assert body["router_version"] == 0 and isinstance(body["latency_ms"], float)
    with grpc.insecure_channel(classifier.running.address) as channel:
        expected = inference_pb2_grpc.InferenceServiceStub(channel).Predict(
            inference_pb2.PredictRequest(
                inputs=TEXTS, aggregation=inference_pb2.AGGREGATION_OUTPUT_ENSEMBLE
            ),
            metadata=bearer(classifier.admin_token),
        )
    for got, want in zip(body["predictions"], expected.predictions, strict=True):
        assert got["output"] == want.output and got["output"] in LABELS
        assert got["confidence"] == pytest.approx(want.confidence, abs=1e-6)
        assert [e["expert_id"] for e in got["experts"]] == [e.expert_id for e in want.experts]
        assert got["experts"][0]["expert_name"] in ("expert0 v1", "expert1 v1")
        scores = got["expert_outputs"][0]["scores"]
        assert sum(s["probability"] for s in scores) == pytest.approx(1.0, abs=1e-4)


def test_route_gives_experts_and_weights_per_input_and_honours_expert_ids(
    classifier: Served,
) -> None:
    with classifier.client(classifier.contributor_token) as http:
        models = http.get("/v1/models").json()["data"]
        assert models[0]["id"] == "moerge" and len(models) == 3
        only = models[2]["id"]
        routed = http.post("/v1/route", json={"inputs": TEXTS, "top_k": 2}).json()
        pinned = http.post("/v1/route", json={"inputs": TEXTS, "expert_ids": [only]}).json()
    assert len(routed["decisions"]) == 2
    for row in routed["decisions"]:
        assert len(row) == 2 and sum(e["weight"] for e in row) == pytest.approx(1.0, abs=1e-5)
    assert [[e["expert_id"] for e in row] for row in pinned["decisions"]] == [[only], [only]]


@pytest.mark.parametrize(
    "path, request_, status, code",
    [
        ("/v1/predict", {"inputs": []}, 400, "invalid_argument"),
        ("/v1/predict", {"inputs": ["x"], "aggregation": "average"}, 400, "invalid_argument"),
        ("/v1/predict", {"inputs": ["x"], "top_k": -1}, 400, "invalid_argument"),
        ("/v1/predict", {"inputs": ["x"], "top_k": 2**40}, 400, "invalid_argument"),
        ("/v1/predict", {"inputs": ["x"], "routing_method": "nope"}, 400, "invalid_argument"),
        ("/v1/predict", {"inputs": ["x"], "colour": "red"}, 400, "invalid_argument"),
        ("/v1/route", {"inputs": ["x"], "aggregation": "ensemble"}, 400, "invalid_argument"),
        ("/v1/route", {"inputs": ["x"], "expert_ids": ["0" * 32]}, 404, "not_found"),
        ("/v1/route", {"inputs": ["x"], "routing_method": "lda"}, 400, "failed_precondition"),
        ("/v1/completions", {"prompt": "hello"}, 400, "failed_precondition"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}]},
            400,
            "failed_precondition",
        ),
    ],
)
def test_refusals_map_to_http_statuses_with_openai_error_bodies(
    classifier: Served, path: str, request_: dict, status: int, code: str
) -> None:
    with classifier.client() as http:
        response = http.post(path, json=request_)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_a_classification_coordinator_tells_completions_to_use_predict(
    classifier: Served,
) -> None:
    with classifier.client() as http:
        error = http.post("/v1/completions", json={"prompt": "hello"}).json()["error"]
    assert "causal_lm" in error["message"] and "Predict" in error["message"]


def test_predict_and_route_need_credentials(classifier: Served) -> None:
    with classifier.client(token="") as http:
        for path in ("/v1/predict", "/v1/route"):
            response = http.post(path, json={"inputs": ["x"]})
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthenticated"


def test_a_role_the_grpc_method_refuses_gets_403(classifier: Served) -> None:
    """The role table is gRPC's: a contributor may not call an AdminService method over HTTP
    either (today every role may infer, so an admin-only route stands in for the check)."""
    state = classifier.running.state
    app = FastAPI()
    app.state.authenticator = AuthInterceptor(
        state.registry.authenticate, state.registry.generation
    )
    errors.install(app)

    @app.get("/admin-only", dependencies=[Depends(caller("/moerge.v1.AdminService/ListExperts"))])
    async def admin_only() -> dict[str, bool]:
        return {"ok": True}

    with TestClient(app) as client:
        contributor, admin = (
            client.get("/admin-only", headers={"Authorization": f"Bearer {token}"})
            for token in (classifier.contributor_token, classifier.admin_token)
        )
    assert contributor.status_code == 403
    assert contributor.json()["error"] == {
        "message": "role 'contributor' may not call /moerge.v1.AdminService/ListExperts",
        "type": "permission_error",
        "code": "permission_denied",
    }
    assert admin.status_code == 200
