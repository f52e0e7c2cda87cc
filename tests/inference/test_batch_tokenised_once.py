"""An engine batch is tokenised once; requests restricted to one expert are neither embedded nor
routed, and run in the same forward as the batch's other single-expert rows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from moerge.coordinator.inference.encoding import rows_of, tokenise
from moerge.coordinator.inference.engine import InferenceEngine, InferenceRequest
from moerge.coordinator.inference.errors import InputTooLong, InvalidTopK
from moerge.coordinator.inference.plan import Aggregation, RoutingPlan
from moerge.coordinator.inference.service import InferenceService, RestrictedRouter
from moerge.coordinator.services.expert_store import read_statistics
from moerge.embedding import pooled_embeddings
from moerge.router_training.base import ExpertRecord
from moerge.router_training.centroid import CentroidRouter, CentroidRouterConfig
from tests.inference.engine_helpers import (
    TEXTS,
    assert_same_predictions,
    make_classification_experts,
)
from tests.tiny_models import make_tiny_bert, make_tiny_llama

ATOL = 1e-5
MAX_LENGTH = 24


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InferenceEngine, dict]]:
    """A truncating engine on the tiny BERT, with the four classification experts."""
    root = tmp_path_factory.mktemp("tokenised-once")
    base = make_tiny_bert(root / "bert")
    folders = make_classification_experts(base, root / "experts")
    engine = InferenceEngine(
        base, max_rank=8, max_length=MAX_LENGTH, expert_loader=folders.__getitem__, truncate=True
    )
    yield engine, folders
    engine.close()


@pytest.fixture(scope="module")
def engine(served: tuple[InferenceEngine, dict]) -> InferenceEngine:
    return served[0]


@pytest.fixture(scope="module")
def experts(served: tuple[InferenceEngine, dict]) -> dict[str, Path]:
    return served[1]


def _router(experts: dict[str, Path], top_k: int = 1) -> CentroidRouter:
    records = [ExpertRecord(e, e, read_statistics(f)) for e, f in experts.items()]
    return CentroidRouter.fit(records, CentroidRouterConfig(top_k=top_k))


@contextmanager
def _recording(engine: InferenceEngine) -> Iterator[tuple[list[int], list[int]]]:
    """(rows of each model forward, texts of each tokenizer call) inside the block."""
    forwards: list[int] = []
    tokenised: list[int] = []
    tokenizer = engine.tokenizer
    call = type(tokenizer).__call__

    def counting(self, texts, *args, **kwargs):  # type: ignore[no-untyped-def]
        tokenised.append(len(texts))
        return call(self, texts, *args, **kwargs)

    handle = engine.model.register_forward_pre_hook(
        lambda _module, _args, kwargs: forwards.append(int(kwargs["input_ids"].shape[0])),
        with_kwargs=True,
    )
    type(tokenizer).__call__ = counting  # the class: the engine calls its own instance
    try:
        yield forwards, tokenised
    finally:
        type(tokenizer).__call__ = call
        handle.remove()


def _requests(experts: dict[str, Path], router: CentroidRouter) -> list[InferenceRequest]:
    """Half routed over every expert, half restricted to one expert each (as Predict plans)."""
    ids = list(experts)
    requests = []
    for i, text in enumerate(TEXTS):
        chosen = router if i % 2 == 0 else RestrictedRouter(router, [ids[i % len(ids)]])
        plan = InferenceService.request_plan(chosen, 0, None, 1)
        requests.append(InferenceRequest([text], plan))
    return requests


def test_a_mixed_batch_is_tokenised_once_and_runs_one_embedding_and_one_expert_forward(
    engine, experts
):
    requests = _requests(experts, _router(experts))
    with _recording(engine) as (forwards, tokenised):
        engine.predict_many(requests)
    routed = sum(1 for r in requests if not r.plan.is_explicit)
    assert tokenised == [len(TEXTS)]
    # the routing embedding of the routed requests only, then every request in one forward
    assert forwards == [routed, len(TEXTS)]


def test_a_batch_of_requests_restricted_to_one_expert_each_is_not_embedded(engine, experts):
    router = _router(experts)
    requests = [
        InferenceRequest(
            [t], InferenceService.request_plan(RestrictedRouter(router, [e]), 0, None, 1)
        )
        for t, e in zip(TEXTS, experts, strict=False)
    ]
    with _recording(engine) as (forwards, _):
        results = engine.predict_many(requests)
    assert forwards == [len(requests)]
    for result, expert in zip(results, experts, strict=False):
        assert not isinstance(result, BaseException)
        assert [(w.expert_id, w.weight) for w in result[0].experts] == [(expert, 1.0)]


def test_batched_predictions_equal_each_request_routed_alone(engine, experts):
    router = _router(experts)
    requests = _requests(experts, router)
    ids = list(experts)
    # alone, and as before: every request routed by its own (restricted) router
    alone = [
        engine.predict(
            [text],
            RoutingPlan.routed(router if i % 2 == 0 else RestrictedRouter(router, [ids[i % 4]])),
        )
        for i, text in enumerate(TEXTS)
    ]
    together = engine.predict_many(requests)
    assert_same_predictions(together, alone, ATOL)


def test_a_restricted_router_keeps_refusing_a_top_k_beyond_its_one_expert(engine, experts):
    restricted = RestrictedRouter(_router(experts), [next(iter(experts))])
    plan = InferenceService.request_plan(restricted, 2, None, 1)
    assert not plan.is_explicit
    with pytest.raises(InvalidTopK):
        engine.predict([TEXTS[0]], plan)


def test_one_expert_plans_keep_a_requested_merge_and_leave_module_mixing_to_the_router(experts):
    restricted = RestrictedRouter(_router(experts), [next(iter(experts))])
    merged = InferenceService.request_plan(restricted, 0, Aggregation.MERGE_TIES, 3)
    assert merged.is_explicit and merged.aggregation is Aggregation.MERGE_TIES
    assert merged.expert_ids == ((next(iter(experts)),),) * 3
    mixed = InferenceService.request_plan(restricted, 0, Aggregation.MODULE_MIX, 1)
    assert not mixed.is_explicit  # refused by the engine as before, with the router's message


def test_routing_embeddings_from_the_shared_tokenisation_equal_the_embedding_space(engine):
    texts = [*TEXTS, "word " * (MAX_LENGTH + 10)]  # the last one is cut by the engine
    shared = engine._call(engine._shared_encoding, texts)
    assert shared is not None and shared.routable == [True] * len(TEXTS) + [False]
    model = AutoModel.from_pretrained(engine.model.config._name_or_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(engine.model.config._name_or_path)
    expected = pooled_embeddings(model, tokenizer, texts)
    got = engine._call(shared.embed, texts)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_an_input_over_the_token_limit_is_refused_from_the_shared_tokenisation(experts):
    base = next(iter(experts.values())).parent.parent / "bert"
    strict = InferenceEngine(base, max_rank=8, max_length=8, expert_loader=experts.__getitem__)
    try:
        plan = RoutingPlan.explicit([[next(iter(experts))]])
        results = strict.predict_many(
            [InferenceRequest(["short text"], plan), InferenceRequest(["word " * 20], plan)]
        )
    finally:
        strict.close()
    assert not isinstance(results[0], BaseException)
    assert isinstance(results[1], InputTooLong) and "input 0 has" in str(results[1])


@pytest.mark.parametrize("maker", [make_tiny_bert, make_tiny_llama])
def test_rows_of_a_batch_equal_the_tokenizer_on_those_texts_alone(tmp_path, maker):
    tokenizer = AutoTokenizer.from_pretrained(maker(tmp_path / "model"))
    causal = maker is make_tiny_llama
    if causal:  # as the engine sets a causal LM up: left padding
        tokenizer.padding_side = "left"
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    texts = ["a b", "a much longer text with many words in it", "c d e f", "g"]
    whole = tokenise(tokenizer, texts, None, causal)
    for index in ([0, 3], [2, 0], [1], [3, 2, 1, 0]):
        alone = tokenise(tokenizer, [texts[i] for i in index], None, causal)
        rows = rows_of(whole, index)
        assert rows.keys() == alone.keys()
        for key in alone:
            assert torch.equal(rows[key], alone[key]), key
