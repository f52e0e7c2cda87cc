"""Routed greedy generation on a tiny random Llama, against PEFT's own generation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from moerge.coordinator.inference.aggregation import merge_lora_factors
from moerge.coordinator.inference.engine import InferenceEngine
from moerge.coordinator.inference.plan import Aggregation, MergeOptions, RoutingPlan
from moerge.coordinator.services.expert_store import read_lora
from moerge.router_training.arrow import ArrowRouter, ArrowRouterConfig
from moerge.router_training.base import ExpertRecord
from moerge.router_training.baselines import BaseModelRouter, BaseModelRouterConfig
from tests.inference.engine_helpers import make_causal_experts, peft_generate
from tests.tiny_models import make_tiny_llama

PROMPTS = ["the film was", "one two three four five", "a big red car on the road to the city"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("causal") / "llama")


@pytest.fixture(scope="module")
def experts(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_causal_experts(base, tmp_path_factory.mktemp("lm-experts"))


@pytest.fixture(scope="module")
def engine(base: Path, experts: dict[str, Path]) -> Iterator[InferenceEngine]:
    engine = InferenceEngine(
        base,
        "causal_lm",
        ["q_proj", "v_proj"],
        max_rank=8,
        cache_bytes=1 << 30,
        max_length=32,
        max_new_tokens=NEW_TOKENS,
        expert_loader=experts.__getitem__,
    )
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def own_generations(base: Path, experts: dict[str, Path]) -> dict[str, list[str]]:
    return {e: peft_generate(base, {e: f}, PROMPTS, NEW_TOKENS) for e, f in experts.items()}


def test_generation_with_one_expert_equals_peft_greedy_generation(engine, own_generations):
    for expert, expected in own_generations.items():
        got = engine.generate(PROMPTS, RoutingPlan.explicit([[expert]] * len(PROMPTS)))
        assert [p.output for p in got] == expected
        assert all(0.0 < p.confidence <= 1.0 for p in got)
        assert all(p.experts[0].expert_id == expert for p in got)


def test_mixed_batch_generation_gives_each_input_its_own_experts_generation(
    engine, own_generations
):
    chosen = ["lm-1", "lm-0", "lm-1"]
    got = engine.generate(PROMPTS, RoutingPlan.explicit([[e] for e in chosen]))
    assert [p.output for p in got] == [own_generations[e][i] for i, e in enumerate(chosen)]
    assert own_generations["lm-0"] != own_generations["lm-1"]  # the experts do differ


def test_linear_merge_generation_equals_peft_concatenated_adapter(engine, base, experts):
    weights = [0.3, 0.7]
    expected = peft_generate(base, experts, PROMPTS, NEW_TOKENS, combine=("cat", weights, {}))
    plan = RoutingPlan.explicit(
        [["lm-0", "lm-1"]] * len(PROMPTS), [weights] * len(PROMPTS), Aggregation.MERGE_LINEAR
    )
    assert [p.output for p in engine.generate(PROMPTS, plan)] == expected


def test_ties_merge_generation_equals_peft_add_weighted_adapter_ties(engine, base, experts):
    weights = [0.4, 0.6]
    expected = peft_generate(
        base, experts, PROMPTS, NEW_TOKENS, combine=("ties", weights, {"density": 0.5})
    )
    plan = RoutingPlan.explicit(
        [["lm-0", "lm-1"]] * len(PROMPTS),
        [weights] * len(PROMPTS),
        Aggregation.MERGE_TIES,
        MergeOptions(density=0.5),
    )
    assert [p.output for p in engine.generate(PROMPTS, plan)] == expected


@torch.no_grad()
def test_ties_merged_factors_equal_peft_add_weighted_adapter(base, experts):
    model = AutoModelForCausalLM.from_pretrained(str(base))
    peft_model = PeftModel.from_pretrained(model, str(experts["lm-0"]), adapter_name="a")
    peft_model.load_adapter(str(experts["lm-1"]), adapter_name="b")
    peft_model.add_weighted_adapter(
        ["a", "b"], [0.25, 0.75], "m", combination_type="ties", density=0.3
    )
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    factors = [(layer.lora_A[n].weight, layer.lora_B[n].weight, layer.scaling[n]) for n in "ab"]
    a, b, scaling = merge_lora_factors(factors, [0.25, 0.75], "ties", density=0.3)
    torch.testing.assert_close(a, layer.lora_A["m"].weight)
    torch.testing.assert_close(b, layer.lora_B["m"].weight)
    assert scaling == layer.scaling["m"] == 1.0


@torch.no_grad()
def test_ensemble_generation_decodes_the_weighted_mixture_of_next_token_distributions(
    engine, base, experts
):
    weights = [0.3, 0.7]
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    models = []
    for expert in ("lm-0", "lm-1"):
        model = AutoModelForCausalLM.from_pretrained(str(base))
        models.append(PeftModel.from_pretrained(model, str(experts[expert])).eval())
    expected = []
    for prompt in PROMPTS:  # one prompt at a time: no padding, no cache, plain argmax
        ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
        new: list[int] = []
        for _ in range(NEW_TOKENS):
            mixed = sum(
                w * torch.softmax(m(input_ids=ids).logits[0, -1], dim=-1)
                for w, m in zip(weights, models, strict=True)
            )
            token = int(torch.argmax(mixed))
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if token == tokenizer.eos_token_id:
                break
        expected.append(tokenizer.decode(new, skip_special_tokens=True))
    plan = RoutingPlan.explicit([["lm-0", "lm-1"]] * len(PROMPTS), [weights] * len(PROMPTS))
    got = engine.generate(PROMPTS, plan)
    assert [p.output for p in got] == expected
    assert [[w.weight for w in p.experts] for p in got] == [pytest.approx(weights)] * 3


def test_module_mixing_in_generation_over_one_expert_equals_its_peft_generation(
    engine, experts, own_generations
):
    record = ExpertRecord("lm-1", "lm-1", None, lambda: read_lora(experts["lm-1"]))
    router = ArrowRouter.fit([record], ArrowRouterConfig(top_k=1))
    got = engine.generate(PROMPTS, RoutingPlan.routed(router))
    assert [p.output for p in got] == own_generations["lm-1"]
    assert all(p.aggregation == "module_mix" for p in got)
    assert all([w.expert_id for w in p.experts] == ["lm-1"] for p in got)


@torch.no_grad()
def test_the_base_router_generates_with_the_frozen_base_model(engine, base):
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    enc = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    out = model.generate(
        **enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )[:, enc["input_ids"].shape[1] :]
    expected = []
    for row in out.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        expected.append(tokenizer.decode(row, skip_special_tokens=True))
    router = BaseModelRouter(BaseModelRouterConfig(), [])
    got = engine.generate(PROMPTS, RoutingPlan.routed(router))
    assert [p.output for p in got] == expected
    assert all(p.experts == () for p in got)
