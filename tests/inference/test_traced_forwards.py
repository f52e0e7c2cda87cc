"""``traced_forwards``: the classification forwards run as TorchScript graphs, with the eager
engine's predictions; graphs are traced again after the bank grows, and a failed trace falls
back to the eager forward."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moerge.coordinator.inference.engine import InferenceEngine, InferenceRequest
from moerge.coordinator.inference.plan import RoutingPlan
from moerge.coordinator.inference.traced import TracedForwards
from moerge.coordinator.services.expert_store import read_statistics
from moerge.router_training.base import ExpertRecord
from moerge.router_training.centroid import CentroidRouter, CentroidRouterConfig
from tests.inference.engine_helpers import (
    TEXTS,
    assert_same_predictions,
    make_classification_experts,
)
from tests.tiny_models import make_tiny_bert


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("traced")
    base = make_tiny_bert(root / "bert")
    return base, make_classification_experts(base, root / "experts")


def make_engine(base: Path, experts: dict[str, Path], traced: bool, **options) -> InferenceEngine:
    records = [ExpertRecord(e, e, read_statistics(f)) for e, f in experts.items()]
    return InferenceEngine(
        base,
        max_rank=8,
        max_length=24,
        expert_loader=experts.__getitem__,
        router=CentroidRouter.fit(records, CentroidRouterConfig(top_k=1)),
        truncate=True,
        traced_forwards=traced,
        **options,
    )


@pytest.fixture(scope="module")
def engines(setup) -> Iterator[tuple[InferenceEngine, InferenceEngine]]:
    """(eager, traced) engines over the same base model and experts."""
    eager, traced = make_engine(*setup, traced=False), make_engine(*setup, traced=True)
    yield eager, traced
    eager.close()
    traced.close()


def serving_batch(experts: dict[str, Path]) -> list[InferenceRequest]:
    """One-input requests as the coordinator batches them: routed, or restricted to one expert."""
    ids = list(experts)
    return [
        InferenceRequest([text], None if i % 2 else RoutingPlan.explicit([[ids[i % len(ids)]]]))
        for i, text in enumerate(TEXTS)
    ]


def graphs_of(engine: InferenceEngine) -> TracedForwards:
    traced = engine.forward.traced
    assert traced is not None
    return traced


def test_a_mixed_batch_through_traced_graphs_gives_the_eager_predictions(engines, setup):
    eager, traced = engines
    requests = serving_batch(setup[1])
    for _ in range(2):  # the first batch traces the graphs, the second runs them
        assert_same_predictions(traced.predict_many(requests), eager.predict_many(requests))
    graphs = graphs_of(traced)
    assert graphs.enabled
    assert {kind for kind, _keys in graphs._graphs} == {"pooled_per_row", "embeddings"}


def test_batches_of_other_sizes_and_lengths_reuse_the_graphs(engines, setup):
    eager, traced = engines
    requests = serving_batch(setup[1])
    traced.predict_many(requests)
    graphs = dict(graphs_of(traced)._graphs)
    for size in (1, 3, len(requests) - 1):
        subset = requests[-size:]
        assert_same_predictions(traced.predict_many(subset), eager.predict_many(subset))
    assert graphs_of(traced)._graphs == graphs


def test_graphs_are_traced_again_when_the_bank_grows(setup):
    base, experts = setup
    eager = make_engine(base, experts, traced=False)
    traced = make_engine(base, experts, traced=True, initial_capacity=1)
    try:
        first = [InferenceRequest([TEXTS[0]], RoutingPlan.explicit([["sent-a"]]))]
        traced.predict_many(first)  # traced while the bank holds one slot
        before = dict(graphs_of(traced)._graphs)
        # the other experts grow the bank: new buffers, which the old graph does not hold
        requests = serving_batch(experts)
        assert_same_predictions(traced.predict_many(requests), eager.predict_many(requests))
        assert traced.bank.capacity > 1
        after = graphs_of(traced)._graphs
        assert before.keys() <= after.keys()
        assert all(after[key] is not graph for key, graph in before.items())
    finally:
        eager.close()
        traced.close()


def test_a_forward_that_cannot_be_traced_is_served_eagerly(setup, monkeypatch):
    base, experts = setup
    eager = make_engine(base, experts, traced=False)
    traced = make_engine(base, experts, traced=True)

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("this model cannot be traced")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    try:
        requests = serving_batch(experts)
        assert_same_predictions(traced.predict_many(requests), eager.predict_many(requests))
        assert not graphs_of(traced).enabled
        assert not graphs_of(traced)._graphs
    finally:
        eager.close()
        traced.close()


def test_an_engine_traces_nothing_by_default(engines):
    eager, _traced = engines
    assert eager.forward.traced is None
