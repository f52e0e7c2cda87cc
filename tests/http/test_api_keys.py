"""User API keys over the HTTP API: they may predict, route and generate; a revoked or expired
key is 401 on its next request; a key over its rate limit gets 429 with ``Retry-After``."""

from __future__ import annotations

import time

import openai

from moerge.client import Client
from moerge.results import CreatedApiKey
from tests.http.conftest import Served

TEXTS = ["the film was great"]


def _key(served: Served, **options: int) -> CreatedApiKey:
    with Client(served.running.address, token=served.admin_token) as admin:
        return admin.create_api_key(note="http", **options)


def test_a_user_key_may_predict_route_and_list_models(classifier: Served) -> None:
    with classifier.client(_key(classifier).api_key) as http:
        assert http.post("/v1/predict", json={"inputs": TEXTS}).status_code == 200
        routed = http.post("/v1/route", json={"inputs": TEXTS})
        assert routed.status_code == 200 and len(routed.json()["decisions"]) == 1
        assert http.get("/v1/models").status_code == 200


def test_a_user_key_may_generate_with_the_openai_package(lm: Served) -> None:
    key = _key(lm).api_key
    client = openai.OpenAI(base_url=f"{lm.url}/v1", api_key=key, max_retries=0)
    completion = client.completions.create(model="moerge", prompt="hello", max_tokens=4)
    assert completion.choices[0].text is not None and completion.usage is not None
    chunks = client.chat.completions.create(
        model="moerge", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_a_revoked_or_expired_key_gets_401_on_its_next_request(classifier: Served) -> None:
    revoked, expiring = _key(classifier), _key(classifier, ttl_seconds=1)
    with classifier.client(revoked.api_key) as http:
        assert http.post("/v1/route", json={"inputs": TEXTS}).status_code == 200
        with Client(classifier.running.address, token=classifier.admin_token) as admin:
            admin.revoke_api_key(revoked.key.key_id)
        refused = http.post("/v1/route", json={"inputs": TEXTS})
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "authentication_error"
    with classifier.client(expiring.api_key) as http:
        assert http.post("/v1/route", json={"inputs": TEXTS}).status_code == 200
        assert expiring.key.expires_at is not None
        time.sleep(max(0.0, expiring.key.expires_at.timestamp() - time.time()) + 0.05)
        assert http.post("/v1/route", json={"inputs": TEXTS}).status_code == 401


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(classifier: Served) -> None:
    with classifier.client(_key(classifier, rate_limit_per_minute=2).api_key) as http:
        assert http.get("/v1/models").status_code == 200  # listing models is not counted
        assert http.post("/v1/route", json={"inputs": TEXTS}).status_code == 200
        assert http.post("/v1/predict", json={"inputs": TEXTS}).status_code == 200
        refused = http.post("/v1/predict", json={"inputs": TEXTS})
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 30  # one request refills in 30 s
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "resource_exhausted"
    assert "2 requests per minute" in error["message"]
