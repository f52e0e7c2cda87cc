"""Scoring given answers of a causal LM under a plan, against PEFT scoring each pair alone."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from moerge.contributor_client.batching import encode_completions
from moerge.coordinator.inference.engine import InferenceEngine
from moerge.coordinator.inference.errors import InferenceInputError
from moerge.coordinator.inference.plan import Aggregation, RoutingPlan
from moerge.router_training.baselines import BaseModelRouter, BaseModelRouterConfig
from tests.inference.engine_helpers import make_causal_experts
from tests.tiny_models import make_tiny_llama

# prompts and answers of different lengths, so that the batch is padded
PAIRS = [
    ("the film was", "good"),
    ("one two three four five", "six seven"),
    ("a big red car on the road to the city", "stops at the lights today"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("scoring") / "llama")


@pytest.fixture(scope="module")
def experts(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_causal_experts(base, tmp_path_factory.mktemp("scoring-experts"))


@pytest.fixture(scope="module")
def engine(base: Path, experts: dict[str, Path]) -> Iterator[InferenceEngine]:
    engine = InferenceEngine(
        base, "causal_lm", ["q_proj", "v_proj"], max_rank=8, expert_loader=experts.__getitem__
    )
    yield engine
    engine.close()


@torch.no_grad()
def token_logprobs(model: torch.nn.Module, base: Path, prompt: str, answer: str) -> torch.Tensor:
    """log p of each answer token (EOS included) after ``prompt``, the pair alone: [n]."""
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    ids, prompt_lengths = encode_completions(tokenizer, [prompt], [answer], 1 << 30)
    input_ids = torch.tensor(ids)  # [1, T]
    logprobs = torch.log_softmax(model(input_ids=input_ids).logits[0, :-1].float(), dim=-1)
    chosen = logprobs.gather(-1, input_ids[0, 1:, None])[:, 0]  # [T-1]: token t+1 given <= t
    return chosen[prompt_lengths[0] - 1 :]


def peft_model(base: Path, folder: Path) -> torch.nn.Module:
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(folder))


def nll(logprobs: torch.Tensor) -> float:
    return float(-logprobs.mean())


def test_base_model_answer_loss_equals_each_pairs_own_loss_scored_alone(engine, base):
    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    expected = [nll(token_logprobs(model, base, p, a)) for p, a in PAIRS]
    plan = RoutingPlan.routed(BaseModelRouter(BaseModelRouterConfig(), []))
    got = engine.answer_losses([p for p, _ in PAIRS], [a for _, a in PAIRS], plan)
    assert got == pytest.approx(expected, rel=1e-4)


def test_one_experts_answer_loss_equals_its_peft_models_and_differs_from_the_base(
    engine, base, experts
):
    prompts, answers = [p for p, _ in PAIRS], [a for _, a in PAIRS]
    base_losses = engine.answer_losses(
        prompts, answers, RoutingPlan.routed(BaseModelRouter(BaseModelRouterConfig(), []))
    )
    for expert, folder in experts.items():
        model = peft_model(base, folder).eval()
        expected = [nll(token_logprobs(model, base, p, a)) for p, a in PAIRS]
        got = engine.answer_losses(prompts, answers, RoutingPlan.explicit([[expert]] * 3))
        assert got == pytest.approx(expected, rel=1e-4)
        assert got != pytest.approx(base_losses, rel=1e-3)


def test_ensemble_answer_loss_mixes_the_experts_token_probabilities(engine, base, experts):
    weights = [0.25, 0.75]
    prompt, answer = PAIRS[1]
    mixed = [
        token_logprobs(peft_model(base, experts[e]).eval(), base, prompt, answer).exp()
        for e in ("lm-0", "lm-1")
    ]
    expected = nll((weights[0] * mixed[0] + weights[1] * mixed[1]).log())
    plan = RoutingPlan.explicit([["lm-0", "lm-1"]], [weights], Aggregation.ENSEMBLE)
    assert engine.answer_losses([prompt], [answer], plan)[0] == pytest.approx(expected, rel=1e-4)
    assert not torch.allclose(mixed[0], mixed[1])  # the experts do differ


def test_a_signed_linear_merge_of_one_expert_at_weight_one_scores_as_the_expert(engine):
    prompts, answers = [p for p, _ in PAIRS], [a for _, a in PAIRS]
    alone = engine.answer_losses(prompts, answers, RoutingPlan.explicit([["lm-1"]] * 3))
    merged = RoutingPlan.explicit(
        [["lm-0", "lm-1"]] * 3, [[0.0, 1.0]] * 3, Aggregation.MERGE_LINEAR, signed=True
    )
    assert engine.answer_losses(prompts, answers, merged) == pytest.approx(alone, rel=1e-4)
    assert all(math.isfinite(v) and v > 0 for v in alone)


def test_answer_losses_refuse_a_missing_answer(engine):
    with pytest.raises(InferenceInputError, match="one answer per prompt"):
        engine.answer_losses(["a", "b"], ["x"])
