"""Few-shot compositions over the HTTP API: listed by ``GET /v1/models``, served by
``/v1/predict`` (``composition``) and by completions with ``model="composition/NAME[/vN]"``,
with plain HTTP and the official ``openai`` package, answering as gRPC does."""

from __future__ import annotations

import openai
import pytest

from moerge.client import Client
from moerge.results import Composition
from moerge.v1 import inference_pb2
from tests.http.conftest import Served
from tests.http.test_completions import grpc_text, openai_client, sse

REVIEWS = [
    ("the film was great", "pos"),
    ("a dull, tired plot", "neg"),
    ("what a delight", "pos"),
    ("I want my money back", "neg"),
]
DEFINITIONS = [("Define: harbour", "port"), ("Define: canine", "dog")]


def _compose(served: Served, name: str, examples: list[tuple[str, str]]) -> Composition:
    with Client(served.running.address, token=served.admin_token) as admin:
        done = list(admin.compose(name, examples, budget=2, seed=1))[-1]
    assert isinstance(done, Composition)
    return done


def _cards(served: Served, kind: str, token: str | None = None) -> dict[str, dict]:
    with served.client(token) as http:
        data = http.get("/v1/models").json()["data"]
    return {m["id"]: m for m in data if m["moerge"]["kind"] == kind}


def test_models_list_each_composition_with_its_newest_version_and_weights(
    classifier: Served,
) -> None:
    first = _compose(classifier, "listed", REVIEWS)
    second = _compose(classifier, "listed", REVIEWS[:2])
    card = _cards(classifier, "composition")["composition/listed"]
    assert card["root"] == f"composition/listed/v{second.version}" and second.version == 2
    assert card["moerge"]["version"] == 2 and card["owned_by"] == second.created_by
    weights = {w["expert_id"]: w["weight"] for w in card["moerge"]["experts"]}
    assert weights == pytest.approx({e.expert_id: e.weight for e in second.experts})
    assert first.version == 1  # older versions stay servable by name/vN, not listed


def test_predict_serves_a_composition_as_grpc_predict_does(classifier: Served) -> None:
    done = _compose(classifier, "reviews", REVIEWS)
    texts = ["a wonderful film", "awful"]
    with Client(classifier.running.address, token=classifier.admin_token) as admin:
        expected = admin.predict(texts, composition="reviews")
    with classifier.client() as http:
        body = http.post("/v1/predict", json={"inputs": texts, "composition": "reviews"})
        pinned = http.post(
            "/v1/predict",
            json={"inputs": texts, "composition": "reviews", "composition_version": done.version},
        )
    assert body.status_code == 200 and pinned.status_code == 200
    answer = body.json()
    assert answer["routing_method"] == "composition" and answer["router_version"] == 0
    assert answer["note"].startswith(f"composition reviews v{done.version}")
    assert [p["output"] for p in answer["predictions"]] == [p.output for p in expected.predictions]
    weights = {e.expert_id: e.weight for e in done.experts}
    for prediction in answer["predictions"]:
        assert {e["expert_id"]: e["weight"] for e in prediction["experts"]} == pytest.approx(
            weights
        )
    assert pinned.json()["predictions"] == answer["predictions"]


def test_a_composition_is_refused_where_it_cannot_be_served(classifier: Served) -> None:
    _compose(classifier, "refusals", REVIEWS)
    with classifier.client() as http:
        route = http.post("/v1/route", json={"inputs": ["x"], "composition": "refusals"})
        unknown = http.post("/v1/predict", json={"inputs": ["x"], "composition": "nope"})
        mixed = http.post(
            "/v1/predict",
            json={"inputs": ["x"], "composition": "refusals", "routing_method": "centroid"},
        )
        too_new = http.post(
            "/v1/predict",
            json={"inputs": ["x"], "composition": "refusals", "composition_version": 9},
        )
    assert route.status_code == 400 and "does not route" in route.json()["error"]["message"]
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    assert mixed.status_code == 400 and "fixes its experts" in mixed.json()["error"]["message"]
    assert too_new.status_code == 404


def test_a_user_key_lists_and_predicts_with_a_composition(classifier: Served) -> None:
    _compose(classifier, "for-users", REVIEWS)
    with Client(classifier.running.address, token=classifier.admin_token) as admin:
        key = admin.create_api_key(note="compositions").api_key
    assert "composition/for-users" in _cards(classifier, "composition", key)
    with classifier.client(key) as http:
        served = http.post("/v1/predict", json={"inputs": ["fine"], "composition": "for-users"})
    assert served.status_code == 200 and served.json()["routing_method"] == "composition"


def test_model_names_a_composition_in_completions_over_plain_http(lm: Served) -> None:
    done = _compose(lm, "define", DEFINITIONS)
    assert "composition/define" in _cards(lm, "composition")
    sampling = inference_pb2.SamplingParams(max_new_tokens=4, temperature=0)
    expected = grpc_text(lm, prompt="Define: feline", sampling=sampling, composition="define")
    request = {"prompt": "Define: feline", "max_tokens": 4, "temperature": 0}
    with lm.client() as http:
        newest = http.post("/v1/completions", json={"model": "composition/define", **request})
        pinned = http.post(
            "/v1/completions", json={"model": f"composition/define/v{done.version}", **request}
        )
        with http.stream(
            "POST",
            "/v1/completions",
            json={
                "model": "composition/define",
                "stream": True,
                **request,
            },
        ) as response:
            chunks = sse(list(response.iter_lines()))
    assert newest.status_code == 200, newest.text
    answer = newest.json()
    assert answer["model"] == "composition/define" and answer["choices"][0]["text"] == expected
    routing = answer["moerge"]
    assert routing["routing_method"] == "composition" and routing["note"] == "composition define v1"
    assert {e["expert_id"]: e["weight"] for e in routing["experts"]} == pytest.approx(
        {e.expert_id: e.weight for e in done.experts}
    )
    assert pinned.json()["choices"][0]["text"] == expected
    assert chunks[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1] if c["choices"]) == expected


def test_the_openai_package_gets_composition_completions_streamed_and_not(lm: Served) -> None:
    _compose(lm, "chat-define", DEFINITIONS)
    client = openai_client(lm)
    assert "composition/chat-define" in [m.id for m in client.models.list()]
    messages = [{"role": "user", "content": "Define: feline"}]
    chat = client.chat.completions.create(
        model="composition/chat-define", messages=messages, max_tokens=4, temperature=0
    )
    assert chat.model_extra["moerge"]["routing_method"] == "composition"
    stream = client.chat.completions.create(
        model="composition/chat-define", messages=messages, max_tokens=4, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="composition 'missing' not found"):
        client.completions.create(model="composition/missing", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="composition/NAME/vN"):
        client.completions.create(model="composition/chat-define/2", prompt="x", max_tokens=2)
