"""Routed classification: every aggregation against the experts' own outputs under plain PEFT."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from moerge.coordinator.inference.engine import InferenceEngine, InferenceRequest
from moerge.coordinator.inference.errors import (
    EmptyBatch,
    InputTooLong,
    InvalidPlan,
    InvalidTopK,
    UnknownExpert,
)
from moerge.coordinator.inference.plan import Aggregation, MergeOptions, RoutingPlan
from moerge.coordinator.inference.service import RestrictedRouter
from moerge.coordinator.rpc.status import status_for
from moerge.coordinator.services.expert_store import read_lora, read_statistics
from moerge.embedding import pooled_embeddings
from moerge.expert_format import ADAPTER_WEIGHTS
from moerge.router_training.arrow import ArrowRouter, ArrowRouterConfig
from moerge.router_training.base import ExpertRecord
from moerge.router_training.baselines import UniformRouter, UniformRouterConfig
from moerge.router_training.centroid import CentroidRouter, CentroidRouterConfig
from tests.inference.engine_helpers import (
    SENTIMENT,
    TEXTS,
    TOPIC,
    make_classification_experts,
    peft_probabilities,
)
from tests.tiny_models import make_tiny_bert

ATOL = 1e-5


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("engine") / "bert")


@pytest.fixture(scope="module")
def experts(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_classification_experts(base, tmp_path_factory.mktemp("experts"))


@pytest.fixture(scope="module")
def reference(base: Path, experts: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Each expert's PEFT distribution on every text: ``{expert: [len(TEXTS), L]}``."""
    return {e: peft_probabilities(base, folder, TEXTS) for e, folder in experts.items()}


@pytest.fixture(scope="module", params=[False, True], ids=["eager", "traced"])
def engine(
    base: Path, experts: dict[str, Path], request: pytest.FixtureRequest
) -> Iterator[InferenceEngine]:
    """Every behaviour below holds with the forwards run eagerly and as traced graphs."""
    engine = InferenceEngine(
        base,
        "classification",
        ["query", "value"],
        max_rank=8,
        cache_bytes=1 << 30,
        max_length=24,
        expert_loader=experts.__getitem__,
        traced_forwards=request.param,
    )
    yield engine
    engine.close()


def records(experts: dict[str, Path], ids: list[str]) -> list[ExpertRecord]:
    return [
        ExpertRecord(e, e, read_statistics(experts[e]), lambda f=experts[e]: read_lora(f))
        for e in ids
    ]


def probs(values: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(values)


def test_top1_routing_returns_each_chosen_experts_own_peft_output(engine, reference):
    chosen = list(itertools.islice(itertools.cycle(["sent-a", "topic", "sent-b"]), len(TEXTS)))
    predictions = engine.predict(TEXTS, RoutingPlan.explicit([[e] for e in chosen]))
    for i, (prediction, expert) in enumerate(zip(predictions, chosen, strict=True)):
        expected = reference[expert][i]
        labels = TOPIC if expert == "topic" else SENTIMENT
        assert [(w.expert_id, w.weight) for w in prediction.experts] == [(expert, 1.0)]
        (own,) = prediction.expert_outputs
        assert own.expert_id == expert and own.labels == labels
        torch.testing.assert_close(probs(own.probabilities), expected, atol=ATOL, rtol=0)
        assert prediction.output == labels[int(expected.argmax())]
        assert prediction.confidence == pytest.approx(float(expected.max()), abs=ATOL)
        assert prediction.latency_ms > 0


@pytest.mark.filterwarnings("ignore:The density")  # PEFT warns that density 1 prunes nothing
@pytest.mark.parametrize(
    "aggregation",
    [
        Aggregation.ENSEMBLE,
        Aggregation.MERGE_LINEAR,
        Aggregation.MERGE_TIES,
        Aggregation.MERGE_DARE_LINEAR,
        Aggregation.MERGE_DARE_TIES,
    ],
)
def test_any_aggregation_of_one_expert_equals_its_peft_output(engine, reference, aggregation):
    # density 1 keeps every entry: merging one expert must give the expert back exactly
    plan = RoutingPlan.explicit(
        [["sent-a"]] * len(TEXTS), aggregation=aggregation, merge=MergeOptions(density=1.0)
    )
    predictions = engine.predict(TEXTS, plan)
    got = torch.stack([probs(p.probabilities) for p in predictions])
    torch.testing.assert_close(got, reference["sent-a"], atol=ATOL, rtol=0)
    assert all(p.aggregation == aggregation.value for p in predictions)


@pytest.mark.parametrize(
    "aggregation",
    [
        Aggregation.ENSEMBLE,
        Aggregation.MERGE_LINEAR,
        Aggregation.MERGE_TIES,
        Aggregation.MERGE_DARE_TIES,
    ],
)
def test_mixed_batch_gives_the_same_predictions_as_one_by_one_calls(engine, aggregation):
    pairs = [
        ["sent-a", "sent-b"],
        ["topic", "sent-a"],
        ["sent-rev", "sent-b"],
        ["sent-b", "sent-a"],
        ["sent-a", "topic"],
        ["topic", "sent-rev"],
    ]
    weights = [[0.7, 0.3], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.35, 0.65]]
    plan = RoutingPlan.explicit(pairs, weights, aggregation, MergeOptions(density=0.6, seed=3))
    batched = engine.predict(TEXTS, plan)
    for i, text in enumerate(TEXTS):
        (single,) = engine.predict([text], plan.rows([i]))
        assert single.output == batched[i].output
        assert single.labels == batched[i].labels
        torch.testing.assert_close(
            probs(single.probabilities), probs(batched[i].probabilities), atol=ATOL, rtol=0
        )
        for one, many in zip(single.expert_outputs, batched[i].expert_outputs, strict=True):
            torch.testing.assert_close(
                probs(one.probabilities), probs(many.probabilities), atol=ATOL, rtol=0
            )


@pytest.mark.parametrize("mode", ["expand", "sequential"])
def test_ensemble_of_experts_with_the_same_labels_is_the_weighted_average_of_peft_outputs(
    engine, reference, mode, monkeypatch
):
    monkeypatch.setattr(engine, "ensemble_mode", mode)
    # sent-rev has the same label set in the opposite head order: it is aligned by name
    plan = RoutingPlan.explicit([["sent-a", "sent-rev"]] * len(TEXTS), [[1.0, 3.0]] * len(TEXTS))
    predictions = engine.predict(TEXTS, plan)
    expected = 0.25 * reference["sent-a"] + 0.75 * reference["sent-rev"][:, [1, 0]]
    got = torch.stack([probs(p.probabilities) for p in predictions])
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    for i, p in enumerate(predictions):
        assert p.labels == SENTIMENT
        assert p.output == SENTIMENT[int(expected[i].argmax())]
        assert [w.weight for w in p.experts] == pytest.approx([0.25, 0.75])
        torch.testing.assert_close(
            probs(p.expert_outputs[1].probabilities), reference["sent-rev"][i], atol=ATOL, rtol=0
        )


def test_ensemble_of_experts_with_different_labels_answers_with_the_top_expert(engine, reference):
    plan = RoutingPlan.explicit([["sent-a", "topic"]] * len(TEXTS), [[0.4, 0.6]] * len(TEXTS))
    for i, p in enumerate(engine.predict(TEXTS, plan)):
        assert p.output == TOPIC[int(reference["topic"][i].argmax())]
        assert p.confidence == pytest.approx(float(reference["topic"][i].max()), abs=ATOL)
        assert p.labels == () and p.probabilities == ()
        assert [o.labels for o in p.expert_outputs] == [SENTIMENT, TOPIC]
        torch.testing.assert_close(
            probs(p.expert_outputs[0].probabilities), reference["sent-a"][i], atol=ATOL, rtol=0
        )


@torch.no_grad()
@pytest.mark.parametrize(("w", "signed"), [([0.3, 0.7], False), ([1.2, -0.5], True)])
def test_linear_merge_equals_peft_with_both_adapters_active_and_the_merged_head(
    engine, base, experts, w, signed
):
    """Also with a composition's signed weights: the LoRA deltas take them as given, the heads
    with unit L1 norm (routed weights already have it)."""
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=2)
    peft_model = PeftModel.from_pretrained(model, str(experts["sent-a"]), adapter_name="a")
    peft_model.load_adapter(str(experts["sent-b"]), adapter_name="b")
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter(["a", "b"])
            module.scaling["a"] *= w[0]
            module.scaling["b"] *= w[1]
    peft_model.eval()
    pooled = peft_model.base_model.model.bert(
        **tokenizer(TEXTS, padding=True, return_tensors="pt")
    ).pooler_output
    heads = [load_file(str(experts[e] / ADAPTER_WEIGHTS)) for e in ("sent-a", "sent-b")]
    h = [x / sum(abs(y) for y in w) for x in w]  # heads: weights with unit L1 norm
    weight = (
        h[0] * heads[0]["base_model.model.classifier.weight"]
        + h[1] * heads[1]["base_model.model.classifier.weight"]
    )
    bias = (
        h[0] * heads[0]["base_model.model.classifier.bias"]
        + h[1] * heads[1]["base_model.model.classifier.bias"]
    )
    expected = torch.softmax(pooled @ weight.T + bias, dim=-1)

    plan = RoutingPlan.explicit(
        [["sent-a", "sent-b"]] * len(TEXTS),
        [w] * len(TEXTS),
        Aggregation.MERGE_LINEAR,
        signed=signed,
    )
    got = torch.stack([probs(p.probabilities) for p in engine.predict(TEXTS, plan)])
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_signed_weights_are_refused_outside_a_linear_merge_and_when_not_finite():
    with pytest.raises(InvalidPlan, match="merge_linear"):
        RoutingPlan.explicit([["a", "b"]], [[1.0, -0.5]], Aggregation.MERGE_TIES, signed=True)
    with pytest.raises(InvalidPlan, match="finite"):
        RoutingPlan.explicit(
            [["a", "b"]], [[1.0, float("inf")]], Aggregation.MERGE_LINEAR, signed=True
        )
    with pytest.raises(InvalidPlan, match="non-negative"):
        RoutingPlan.explicit([["a", "b"]], [[1.0, -0.5]], Aggregation.MERGE_LINEAR)


def test_merge_with_different_label_sets_uses_the_top_experts_head(engine):
    plan = RoutingPlan.explicit(
        [["sent-a", "topic"], ["topic", "sent-a"]], [[0.8, 0.2]] * 2, Aggregation.MERGE_TIES
    )
    first, second = engine.predict(TEXTS[:2], plan)
    assert first.labels == SENTIMENT and second.labels == TOPIC


def test_example_router_routes_on_the_frozen_base_embedding(engine, base, experts):
    ids = ["sent-a", "sent-b", "topic"]
    router = CentroidRouter.fit(records(experts, ids), CentroidRouterConfig(top_k=2))
    embeddings = engine.embed(TEXTS)
    with torch.no_grad():
        own = pooled_embeddings(
            AutoModel.from_pretrained(str(base)), AutoTokenizer.from_pretrained(str(base)), TEXTS
        )
    torch.testing.assert_close(embeddings, own, atol=1e-6, rtol=0)  # no expert leaks in

    explicit = RoutingPlan.from_decision(router, router.route_examples(embeddings, 2))
    expected = engine.predict(TEXTS, explicit)
    got = engine.predict(TEXTS, RoutingPlan.routed(router, top_k=2))
    assert [p.experts for p in got] == [p.experts for p in expected]
    assert [p.output for p in got] == [p.output for p in expected]
    assert engine.route(TEXTS, RoutingPlan.routed(router, top_k=2)) == [p.experts for p in got]


def test_module_mixing_through_a_token_router_over_one_expert_equals_its_peft_output(
    engine, experts, reference
):
    router = ArrowRouter.fit(records(experts, ["sent-a"]), ArrowRouterConfig(top_k=1))
    predictions = engine.predict(TEXTS, RoutingPlan.routed(router))
    got = torch.stack([probs(p.probabilities) for p in predictions])
    torch.testing.assert_close(got, reference["sent-a"], atol=ATOL, rtol=0)
    assert all(p.aggregation == "module_mix" for p in predictions)
    assert all(
        [(w.expert_id, round(w.weight, 6)) for w in p.experts] == [("sent-a", 1.0)]
        for p in predictions
    )


def test_module_mixing_reports_mean_token_weights_and_the_most_used_experts_head(engine, experts):
    ids = ["sent-a", "sent-b", "topic"]
    router = ArrowRouter.fit(records(experts, ids), ArrowRouterConfig(top_k=2))
    for p in engine.predict(TEXTS, RoutingPlan.routed(router)):
        weights = [w.weight for w in p.experts]
        assert sum(weights) == pytest.approx(1.0)
        assert weights == sorted(weights, reverse=True)
        top = p.experts[0].expert_id
        assert p.labels == (TOPIC if top == "topic" else SENTIMENT)
        assert p.output in p.labels


def test_predict_many_batches_compatible_requests_and_isolates_bad_ones(engine, reference):
    good = [InferenceRequest([t], RoutingPlan.explicit([["sent-a"]])) for t in TEXTS[:3]]
    bad = InferenceRequest([TEXTS[0]], RoutingPlan.explicit([["nobody"]]))
    results = engine.predict_many([good[0], bad, good[1], good[2]])
    assert isinstance(results[1], UnknownExpert)
    for i, result in zip([0, 1, 2], [results[0], results[2], results[3]], strict=True):
        assert not isinstance(result, BaseException)
        torch.testing.assert_close(
            probs(result[0].probabilities), reference["sent-a"][i], atol=ATOL, rtol=0
        )


@pytest.mark.parametrize(
    ("texts", "plan", "error", "code"),
    [
        ([], RoutingPlan.explicit([]), EmptyBatch, grpc.StatusCode.INVALID_ARGUMENT),
        (
            ["good " * 40],
            RoutingPlan.explicit([["sent-a"]]),
            InputTooLong,
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            TEXTS[:1],
            RoutingPlan.explicit([["sent-a"], ["sent-b"]]),
            InvalidPlan,
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            TEXTS[:1],
            RoutingPlan.explicit([["no-such-expert"]]),
            UnknownExpert,
            grpc.StatusCode.NOT_FOUND,
        ),
    ],
)
def test_bad_requests_raise_errors_the_servicer_shows_to_the_caller(
    engine, texts, plan, error, code
):
    with pytest.raises(error) as caught:
        engine.predict(texts, plan)
    assert isinstance(caught.value, (ValueError, LookupError))
    assert status_for(caught.value)[0] is code


@pytest.mark.parametrize("top_k", [0, 4])
def test_top_k_outside_one_to_the_number_of_experts_is_refused(engine, experts, top_k):
    router = CentroidRouter.fit(
        records(experts, ["sent-a", "sent-b", "topic"]), CentroidRouterConfig(top_k=1)
    )
    with pytest.raises(InvalidTopK):
        engine.predict(TEXTS, RoutingPlan.routed(router, top_k=top_k))


def test_a_restricted_router_refuses_top_k_beyond_its_allowed_experts(engine, experts):
    router = CentroidRouter.fit(
        records(experts, ["sent-a", "sent-b", "topic"]), CentroidRouterConfig(top_k=1)
    )
    restricted = RestrictedRouter(router, ["sent-a", "topic"])
    with pytest.raises(InvalidTopK, match="between 1 and 2"):  # 3 experts, 2 of them allowed
        engine.predict(TEXTS, RoutingPlan.routed(restricted, top_k=3))
    predictions = engine.predict(TEXTS, RoutingPlan.routed(restricted, top_k=2))
    assert {w.expert_id for p in predictions for w in p.experts} <= {"sent-a", "topic"}


def test_a_restricted_uniform_router_uses_every_allowed_expert_by_default():
    # the uniform router's config has no top_k ("every expert"): restricted, every allowed one
    router = UniformRouter(UniformRouterConfig(), ["sent-a", "sent-b", "topic"])
    decision = RestrictedRouter(router, ["sent-a", "topic"]).route_examples(torch.zeros(2, 4))
    assert decision.indices.tolist() == [[0, 2], [0, 2]]
    assert decision.weights.tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_character_limit_is_checked_before_tokenizing(base, experts):
    engine = InferenceEngine(base, max_rank=8, max_chars=10, expert_loader=experts.__getitem__)
    try:
        with pytest.raises(InputTooLong, match="characters"):
            engine.predict(["a" * 11], RoutingPlan.explicit([["sent-a"]]))
    finally:
        engine.close()
