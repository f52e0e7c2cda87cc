"""Concurrent requests routed by different routers share one embedding pass and one forward."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from moerge.coordinator.inference.engine import InferenceEngine, InferenceRequest
from moerge.coordinator.inference.errors import EmptyBatch, InvalidTopK
from moerge.coordinator.inference.plan import RoutingPlan
from moerge.coordinator.services.expert_store import read_statistics
from moerge.router_training.base import ExpertRecord
from moerge.router_training.centroid import CentroidRouter, CentroidRouterConfig
from tests.inference.engine_helpers import (
    TEXTS,
    assert_same_predictions,
    make_classification_experts,
)
from tests.tiny_models import make_tiny_bert

ATOL = 1e-5


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("together")
    return make_classification_experts(make_tiny_bert(root / "bert"), root / "experts")


@pytest.fixture(scope="module")
def engine(experts: dict[str, Path]) -> Iterator[InferenceEngine]:
    base = next(iter(experts.values())).parent.parent / "bert"
    engine = InferenceEngine(
        base,
        "classification",
        ["query", "value"],
        max_rank=8,
        cache_bytes=1 << 30,
        max_length=24,
        expert_loader=experts.__getitem__,
    )
    yield engine
    engine.close()


def _router(experts: dict[str, Path], ids: list[str], top_k: int) -> CentroidRouter:
    records = [ExpertRecord(e, e, read_statistics(experts[e])) for e in ids]
    return CentroidRouter.fit(records, CentroidRouterConfig(top_k=top_k))


@contextmanager
def _counting_forwards(engine: InferenceEngine) -> Iterator[list[int]]:
    calls: list[int] = []
    handle = engine.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def test_requests_of_different_routers_run_in_one_pass_with_their_own_results(engine, experts):
    # one router per expert (as requests restricted to one expert each get), plus a top-2 one
    routers = [_router(experts, [e], 1) for e in experts] + [_router(experts, list(experts), 2)]
    requests = [
        InferenceRequest([TEXTS[i]], RoutingPlan.routed(router)) for i, router in enumerate(routers)
    ]
    alone = [engine.predict(r.texts, r.plan) for r in requests]
    with _counting_forwards(engine) as forwards:
        together = engine.predict_many(requests)
    # one embedding pass, one forward for the top-1 rows, two for the top-2 row (sequential
    # ensembling on CPU); one by one it was an embedding pass and k forwards per request
    assert len(forwards) == 1 + 1 + 2
    assert_same_predictions(together, alone, ATOL)


def test_a_request_that_cannot_be_routed_fails_alone(engine, experts):
    router = _router(experts, list(experts), 1)
    good = [InferenceRequest([t], RoutingPlan.routed(router)) for t in TEXTS[:2]]
    bad = InferenceRequest([TEXTS[2]], RoutingPlan.routed(router, top_k=len(experts) + 1))
    results = engine.predict_many([good[0], bad, good[1]])
    assert isinstance(results[1], InvalidTopK)
    assert all(not isinstance(r, BaseException) and len(r) == 1 for r in (results[0], results[2]))


def test_a_request_refused_for_its_texts_does_not_keep_the_others_from_routing_together(
    engine, experts
):
    routers = [_router(experts, [e], 1) for e in ("sent-a", "topic")]
    good = [InferenceRequest([TEXTS[i]], RoutingPlan.routed(r)) for i, r in enumerate(routers)]
    empty = InferenceRequest([], RoutingPlan.routed(routers[0]))
    with _counting_forwards(engine) as forwards:
        results = engine.predict_many([good[0], empty, good[1]])
    assert isinstance(results[1], EmptyBatch)
    assert all(not isinstance(r, BaseException) and len(r) == 1 for r in (results[0], results[2]))
    assert len(forwards) == 1 + 1  # one embedding pass, one forward for both good requests
