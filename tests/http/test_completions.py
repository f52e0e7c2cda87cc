"""OpenAI-compatible completions over HTTP on a real causal-LM coordinator: plain HTTP (httpx)
and the official ``openai`` package, streamed and not, routed and pinned, refusals, and a client
that leaves mid-stream."""

from __future__ import annotations

import json
import time

import grpc
import openai
import pytest

from moerge.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.coordinator.harness import bearer
from tests.http.conftest import Served

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the film was"}]


def sse(lines: list[str]) -> list[dict | str]:
    """The ``data:`` payloads of a server-sent event stream, JSON-decoded but ``[DONE]``."""
    payloads = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def grpc_text(served: Served, **request: object) -> str:
    """The same request through gRPC Generate, for comparison."""
    with grpc.insecure_channel(served.running.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        events = stub.Generate(
            inference_pb2.GenerateRequest(**request), metadata=bearer(served.admin_token)
        )
        return "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")


def openai_client(served: Served, token: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{served.url}/v1", api_key=token or served.admin_token, max_retries=0, timeout=120
    )


def expert_ids(served: Served) -> dict[str, str]:
    with served.client() as http:
        models = http.get("/v1/models").json()["data"]
    return {m["moerge"]["name"]: m["id"] for m in models if m["moerge"]["kind"] == "expert"}


def test_a_completion_has_openai_fields_usage_routing_and_the_grpc_text(lm: Served) -> None:
    with lm.client() as http:
        response = http.post(
            "/v1/completions", json={"prompt": "the film was", "temperature": 0, "max_tokens": 6}
        )
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == "moerge"
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 6 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    routing = body["moerge"]
    assert routing["routing_method"] == "centroid" and len(routing["experts"]) == 1
    assert routing["experts"][0]["expert_name"] in ("expert0 v1", "expert1 v1")
    sampling = inference_pb2.SamplingParams(max_new_tokens=6, temperature=0)
    assert choice["text"] == grpc_text(lm, prompt="the film was", sampling=sampling)


def test_a_streamed_chat_is_role_then_deltas_then_finish_usage_and_done(lm: Served) -> None:
    request = {
        "messages": CHAT,
        "stream": True,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    with lm.client() as http, http.stream("POST", "/v1/chat/completions", json=request) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = sse(list(stream.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["moerge"]["experts"]
    last, usage = chunks[-2], chunks[-1]
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2])
    with lm.client() as http:
        whole = http.post("/v1/chat/completions", json={"messages": CHAT, "temperature": 0}).json()
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": streamed}
    assert whole["usage"] == usage["usage"]


def test_the_openai_package_gets_completions_and_chat_streamed_and_not(lm: Served) -> None:
    client = openai_client(lm)
    completion = client.completions.create(
        model="moerge", prompt="the film was", max_tokens=5, temperature=0
    )
    assert completion.usage.completion_tokens <= 5
    assert completion.model_extra["moerge"]["experts"]
    streamed = client.completions.create(
        model="moerge", prompt="the film was", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text

    chat = client.chat.completions.create(model="moerge", messages=CHAT, max_tokens=5, seed=7)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        client.chat.completions.create(
            model="moerge",
            messages=CHAT,
            max_tokens=5,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content  # same seed: same sampled text
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_models_list_the_routed_model_and_each_active_expert(lm: Served) -> None:
    models = openai_client(lm).models.list().data
    assert models[0].id == "moerge" and models[0].model_extra["moerge"]["kind"] == "routed"
    experts = {
        m.model_extra["moerge"]["name"]: m
        for m in models
        if m.model_extra["moerge"]["kind"] == "expert"
    }
    assert sorted(experts) == ["expert0", "expert1"]
    assert all(m.owned_by and m.model_extra["root"] == m.id for m in experts.values())


@pytest.mark.parametrize("naming", ["id", "name vN", "name"])
def test_model_pins_one_expert_like_expert_ids(lm: Served, naming: str) -> None:
    target = expert_ids(lm)["expert1"]
    model = {"id": target, "name vN": "expert1 v1", "name": "expert1"}[naming]
    completion = openai_client(lm).completions.create(
        model=model, prompt="the film was", max_tokens=5, temperature=0
    )
    assert completion.model == model
    assert [e["expert_id"] for e in completion.model_extra["moerge"]["experts"]] == [target]
    sampling = inference_pb2.SamplingParams(max_new_tokens=5, temperature=0)
    assert completion.choices[0].text == grpc_text(
        lm, prompt="the film was", sampling=sampling, expert_ids=[target]
    )


def test_a_method_name_as_model_and_the_moerge_extension_reach_the_router(lm: Served) -> None:
    with grpc.insecure_channel(lm.running.address) as channel:  # `model="centroid"` needs one
        trained = admin_pb2_grpc.AdminServiceStub(channel).TrainRouter(
            admin_pb2.TrainRouterRequest(method="centroid"), metadata=bearer(lm.admin_token)
        )
    with lm.client() as http:  # now listed, as the router that `model="centroid"` serves
        models = {m["id"]: m["moerge"] for m in http.get("/v1/models").json()["data"]}
    assert models["centroid"] == {"kind": "router", "version": trained.version}
    assert models["moerge"]["router_version"] == trained.version
    target = expert_ids(lm)["expert0"]
    chat = openai_client(lm).chat.completions.create(
        model="centroid",
        messages=CHAT,
        max_tokens=3,
        extra_body={"moerge": {"expert_ids": [target], "top_k": 1, "aggregation": "merge"}},
    )
    routing = chat.model_extra["moerge"]
    assert routing["routing_method"] == "centroid" and routing["router_version"] >= 1
    assert [e["expert_id"] for e in routing["experts"]] == [target]
    assert routing["aggregation"] == "merge_linear"


@pytest.mark.parametrize(
    "request_, fragment",
    [
        ({"n": 2}, "n: only 1"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -1}, "presence_penalty"),
        ({"temperature": 100}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**12}, "max_tokens"),
        ({"stop": ["s"] * 20}, "stop"),
        ({"seed": 2**70}, "request"),
        ({"logprobs": 2}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"prompt": ["a", "b"]}, "one prompt"),
        ({"prompt": "   "}, "blank"),
        ({"moerge": {"aggregation": "average"}}, "aggregation"),
        ({"moerge": {"top_k": 9}}, "top_k"),
        ({"moerge": {"nonsense": 1}}, "nonsense"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_bad_requests_get_400_with_an_openai_error_and_the_server_keeps_serving(
    lm: Served, request_: dict, fragment: str
) -> None:
    with lm.client() as http:
        response = http.post("/v1/completions", json={"prompt": "the film was", **request_})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "invalid_argument"
        assert fragment in error["message"]
        assert http.post("/v1/completions", json={"prompt": "one two"}).status_code == 200


def test_the_openai_package_raises_its_own_errors(lm: Served) -> None:
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        openai_client(lm).chat.completions.create(
            model="moerge", messages=CHAT, frequency_penalty=1.0
        )
    with pytest.raises(openai.NotFoundError, match="GET /v1/models"):
        openai_client(lm).completions.create(model="no-such-expert", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai_client(lm, token="mgc_not_a_token").models.list()


@pytest.mark.parametrize("header", [None, "Bearer nonsense", "Basic abc", "bearer {admin}x"])
def test_missing_or_bad_credentials_get_401(lm: Served, header: str | None) -> None:
    headers = {"Authorization": header.format(admin=lm.admin_token)} if header else {}
    with lm.client(token="") as http:
        response = http.post("/v1/completions", json={"prompt": "x"}, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["type"] == "authentication_error"


def test_the_bearer_scheme_is_case_insensitive_and_contributors_may_infer(lm: Served) -> None:
    with lm.client(token="") as http:
        for header in (f"bearer {lm.admin_token}", f"BEARER {lm.contributor_token}"):
            response = http.get("/v1/models", headers={"Authorization": header})
            assert response.status_code == 200


def test_a_client_that_leaves_mid_stream_cancels_its_generation(
    lm: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    with lm.client() as http:  # the engine starts on the first request
        assert http.post("/v1/completions", json={"prompt": "one"}).status_code == 200
    scheduler = lm.running.state.inference.engine.scheduler
    decode = scheduler._decode

    def slow_decode() -> None:  # a model slower than its reader: 120 tokens take >= 2.4 s
        made = scheduler.tokens
        decode()  # one step, or a chunk of greedy steps: 20 ms for each token it made
        time.sleep(0.02 * max(1, scheduler.tokens - made))

    # (the tiny Llama could otherwise finish before the client leaves: a lagging reader gets
    # the waiting text joined into one event, so three events may already hold all 120 tokens)
    monkeypatch.setattr(scheduler, "_decode", slow_decode)
    before = scheduler.tokens
    request = {"prompt": "one", "max_tokens": 120, "stream": True, "stop": ["never-said"]}
    with lm.client() as http, http.stream("POST", "/v1/completions", json=request) as stream:
        assert stream.status_code == 200, stream.read()
        data = (line for line in stream.iter_lines() if line.startswith("data: "))
        start, *deltas = (json.loads(next(data).removeprefix("data: ")) for _ in range(3))
        assert start["moerge"]["experts"] and all(d["choices"][0]["text"] for d in deltas)
    # the connection is closed here, the 120 tokens (the tiny Llama's 128 positions) not yet read
    deadline = time.monotonic() + 10
    while scheduler.load != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.load == (0, 0)
    assert scheduler.tokens - before < 120, scheduler.tokens - before  # cancelled, not finished
    with lm.client() as http:
        assert http.post("/v1/completions", json={"prompt": "one two"}).status_code == 200


def test_unknown_paths_and_methods_get_openai_shaped_errors(lm: Served) -> None:
    with lm.client() as http:
        missing, wrong = http.get("/v1/engines"), http.get("/v1/completions")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "invalid_request_error"
