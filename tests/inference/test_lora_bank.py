"""The LoRA bank: PEFT adapters loaded into slots serve exactly what PEFT serves.

Example-level routing through the bank is compared with PEFT itself (``set_adapter`` and
mixed-adapter batches through ``adapter_names=``) on tiny BERT and Llama models; slot
bookkeeping (growth, removal, reuse, replacement) is checked on the bank's buffers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModel

from moerge.coordinator.inference.lora_bank import LoraBank, RoutedLoraLinear
from moerge.coordinator.inference.mixing import (
    add_example_mixed_delta_,
    clean_example_decision,
    example_mixed_delta,
)
from tests.tiny_models import make_tiny_bert, make_tiny_llama

TARGETS = ["query", "value"]
#: (name, rank, alpha, use_rslora): ranks differ, so the bank zero-pads them to max_rank.
ADAPTERS = [("a", 2, 4.0, False), ("b", 4, 16.0, False), ("c", 8, 8.0, True)]
MAX_RANK = 8


def save_adapter(
    base: Path, out: Path, rank: int, alpha: float, rslora: bool, seed: int, targets: list[str]
) -> Path:
    """A PEFT LoRA adapter with random non-zero A and B, saved as PEFT saves it."""
    torch.manual_seed(seed)
    model = AutoModel.from_pretrained(str(base))
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets)
    peft_model = get_peft_model(model, config)
    for module in peft_model.modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            torch.nn.init.normal_(module.lora_A["default"].weight, std=0.3)
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.3)
    peft_model.save_pretrained(str(out))
    return out


def read_adapter(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    config = json.loads((folder / "adapter_config.json").read_text())
    return LoraBank.lora_weights_from_peft(
        load_file(str(folder / "adapter_model.safetensors")), config
    )


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bank_bert")
    paths = {"base": make_tiny_bert(root / "base")}
    for i, (name, rank, alpha, rslora) in enumerate(ADAPTERS):
        paths[name] = save_adapter(paths["base"], root / name, rank, alpha, rslora, i, TARGETS)
    return paths


@pytest.fixture(scope="module")
def peft_bert(bert: dict[str, Path]) -> PeftModel:
    """All adapters loaded into one PeftModel, as PEFT serves them."""
    base = AutoModel.from_pretrained(str(bert["base"])).eval()
    model = PeftModel.from_pretrained(base, str(bert["a"]), adapter_name="a")
    for name, *_ in ADAPTERS[1:]:
        model.load_adapter(str(bert[name]), adapter_name=name)
    return model.eval()


def bank_model(base: Path, capacity: int = 8, targets: list[str] = TARGETS):
    model = AutoModel.from_pretrained(str(base)).eval()
    return model, LoraBank.inject(model, targets, max_rank=MAX_RANK, initial_capacity=capacity)


def batch(n: int = 4, length: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, 60, (n, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # one padded example
    return {"input_ids": ids, "attention_mask": mask}


def hidden(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).last_hidden_state


def route(bank: LoraBank, slots: list[list[int]], weights: list[list[float]]):
    return bank.route_examples(torch.tensor(slots), torch.tensor(weights))


# ------------------------------------------------------------------------------------------
# PEFT files
# ------------------------------------------------------------------------------------------
def test_lora_weights_from_peft_gives_module_paths_factors_and_scaling(bert, peft_bert):
    for name, rank, alpha, rslora in ADAPTERS:
        weights = read_adapter(bert[name])
        assert sorted(weights) == sorted(
            f"encoder.layer.{i}.attention.self.{t}" for i in range(2) for t in TARGETS
        )
        expected = alpha / math.sqrt(rank) if rslora else alpha / rank
        for path, (A, B, scaling) in weights.items():
            layer = peft_bert.base_model.model.get_submodule(path)
            assert A.shape == (rank, 32) and B.shape == (32, rank)
            torch.testing.assert_close(A, layer.lora_A[name].weight, rtol=0, atol=0)
            torch.testing.assert_close(B, layer.lora_B[name].weight, rtol=0, atol=0)
            assert scaling == pytest.approx(expected)
            assert scaling == pytest.approx(layer.scaling[name])


def test_lora_weights_from_peft_reads_in_memory_keys_and_alpha_pattern():
    A, B = torch.randn(2, 5), torch.randn(3, 2)
    state = {
        "base_model.model.enc.q.lora_A.default.weight": A,
        "base_model.model.enc.q.lora_B.default.weight": B,
        "base_model.model.enc.v.lora_A.weight": A,
        "base_model.model.enc.v.lora_B.weight": B,
        "base_model.model.classifier.modules_to_save.weight": torch.randn(2, 3),
    }
    weights = LoraBank.lora_weights_from_peft(
        state, {"r": 2, "lora_alpha": 4, "alpha_pattern": {"v": 8}}
    )
    assert sorted(weights) == ["enc.q", "enc.v"]
    assert weights["enc.q"][2] == 2.0 and weights["enc.v"][2] == 4.0


def test_lora_weights_from_peft_rejects_unsupported_adapters():
    state = {"m.lora_A.weight": torch.randn(2, 4), "m.lora_B.weight": torch.randn(4, 2)}
    with pytest.raises(ValueError, match="use_dora"):
        LoraBank.lora_weights_from_peft(state, {"r": 2, "lora_alpha": 2, "use_dora": True})
    with pytest.raises(ValueError, match="lora_A only"):
        LoraBank.lora_weights_from_peft({"m.lora_A.weight": torch.randn(2, 4)}, {"r": 2})
    with pytest.raises(ValueError, match="no LoRA weights"):
        LoraBank.lora_weights_from_peft({"classifier.weight": torch.randn(2, 4)}, {"r": 2})


# ------------------------------------------------------------------------------------------
# example-level routing against PEFT
# ------------------------------------------------------------------------------------------
def test_inject_replaces_matching_linears_by_suffix_like_peft(bert):
    model, bank = bank_model(bert["base"])
    assert sorted(bank.modules) == sorted(
        f"encoder.layer.{i}.attention.self.{t}" for i in range(2) for t in TARGETS
    )
    for name, module in bank.modules.items():
        assert model.get_submodule(name) is module
        assert isinstance(module, RoutedLoraLinear) and module.name == name
        assert not module.base_layer.weight.requires_grad
    assert isinstance(model.get_submodule("encoder.layer.0.attention.self.key"), torch.nn.Linear)
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        LoraBank.inject(AutoModel.from_pretrained(str(bert["base"])), ["nothing"], max_rank=2)


def test_top1_example_routing_equals_peft_with_that_adapter_active(bert, peft_bert):
    model, bank = bank_model(bert["base"])
    inputs = batch()
    for name, *_ in ADAPTERS:
        slot = bank.add_expert(name, read_adapter(bert[name]))
        peft_bert.set_adapter(name)
        expected = hidden(peft_bert, inputs)
        with route(bank, [[slot]] * 4, [[1.0]] * 4):
            got = hidden(model, inputs)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    peft_bert.set_adapter("a")


def test_bgmv_switch_is_shared_by_every_module_and_changes_nothing_off_cuda(bert, peft_bert):
    model, bank = bank_model(bert["base"])
    slot = bank.add_expert("a", read_adapter(bert["a"]))
    assert bank.bgmv_kernels is False  # off by default
    bank.bgmv_kernels = True
    assert all(m._state.bgmv_kernels for m in bank.modules.values())
    peft_bert.set_adapter("a")
    inputs = batch(length=1)  # one token per row: the decode shape the kernels serve on CUDA
    with route(bank, [[slot]] * 4, [[1.0]] * 4):
        got = hidden(model, inputs)
    torch.testing.assert_close(got, hidden(peft_bert, inputs), rtol=1e-5, atol=1e-5)


def test_mixed_batch_equals_peft_adapter_names_and_one_by_one_calls(bert, peft_bert):
    model, bank = bank_model(bert["base"])
    slots = {name: bank.add_expert(name, read_adapter(bert[name])) for name, *_ in ADAPTERS}
    inputs = batch()
    chosen = ["c", "__base__", "a", "b"]
    expected = hidden(peft_bert, inputs, adapter_names=chosen)
    rows = [[slots.get(n, -1)] for n in chosen]
    with route(bank, rows, [[0.0 if n == "__base__" else 1.0] for n in chosen]):
        mixed = hidden(model, inputs)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
    for i, row in enumerate(rows):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        with route(bank, [row], [[1.0]]):
            single = hidden(model, one)
        torch.testing.assert_close(mixed[i : i + 1], single, rtol=1e-5, atol=1e-5)


def test_two_experts_per_example_equal_linear_merge_of_their_delta_weights(bert):
    model, bank = bank_model(bert["base"])
    factors = {name: read_adapter(bert[name]) for name in ("a", "c")}
    slots = [bank.add_expert(name, factors[name]) for name in ("a", "c")]
    merged = AutoModel.from_pretrained(str(bert["base"])).eval()
    with torch.no_grad():
        for path in bank.modules:
            layer = merged.get_submodule(path)
            for name, w in (("a", 0.3), ("c", 0.7)):
                A, B, scaling = factors[name][path]
                layer.weight += w * scaling * (B @ A)
    inputs = batch()
    with route(bank, [slots] * 4, [[0.3, 0.7]] * 4):
        got = hidden(model, inputs)
    torch.testing.assert_close(got, hidden(merged, inputs), rtol=1e-5, atol=1e-5)


def test_base_model_outside_routing_and_under_no_routing(bert):
    model, bank = bank_model(bert["base"])
    bank.add_expert("a", read_adapter(bert["a"]))
    plain = AutoModel.from_pretrained(str(bert["base"])).eval()
    inputs = batch()
    expected = hidden(plain, inputs)
    torch.testing.assert_close(hidden(model, inputs), expected, rtol=0, atol=0)
    with route(bank, [[0]] * 4, [[1.0]] * 4):
        assert not torch.allclose(hidden(model, inputs), expected)
        with bank.no_routing():
            torch.testing.assert_close(hidden(model, inputs), expected, rtol=0, atol=0)
        assert not torch.allclose(hidden(model, inputs), expected)


def test_llama_example_routing_equals_peft_on_q_k_v_o(tmp_path):
    base = make_tiny_llama(tmp_path / "llama")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    folder = save_adapter(base, tmp_path / "expert", 4, 8.0, False, 3, targets)
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(base)), str(folder))
    model, bank = bank_model(base, targets=targets)
    assert {m.out_features for m in bank.modules.values()} == {16, 32}  # grouped-query k/v
    slot = bank.add_expert("x", read_adapter(folder))
    inputs = {"input_ids": torch.randint(7, 60, (3, 6))}
    expected = hidden(peft_model.eval(), inputs)
    with route(bank, [[slot], [-1], [slot]], [[1.0], [0.0], [1.0]]):
        got = hidden(model, inputs)
    torch.testing.assert_close(got[[0, 2]], expected[[0, 2]], rtol=1e-5, atol=1e-5)
    with peft_model.disable_adapter():
        torch.testing.assert_close(got[1], hidden(peft_model, inputs)[1], rtol=1e-5, atol=1e-5)


def test_example_routing_expands_over_rows_repeated_by_generate(bert):
    model, bank = bank_model(bert["base"])
    slots = [bank.add_expert(name, read_adapter(bert[name])) for name in ("a", "b")]
    inputs = batch(n=2)
    repeated = {k: v.repeat_interleave(3, dim=0) for k, v in inputs.items()}
    with route(bank, [[slots[0]], [slots[1]]], [[1.0], [1.0]]):
        got = hidden(model, repeated)
    with route(bank, [[slots[0]]] * 3 + [[slots[1]]] * 3, [[1.0]] * 6):
        expected = hidden(model, repeated)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with route(bank, [[slots[0]]] * 4, [[1.0]] * 4), pytest.raises(ValueError, match="rows"):
        hidden(model, repeated)


# ------------------------------------------------------------------------------------------
# slots: growth, removal, replacement, padding
# ------------------------------------------------------------------------------------------
def test_adding_experts_grows_capacity_in_place_without_rebuilding_the_model(bert, peft_bert):
    model, bank = bank_model(bert["base"], capacity=2)
    modules_before = {name: id(m) for name, m in model.named_modules()}
    base_ptrs = {name: m.base_layer.weight.data_ptr() for name, m in bank.modules.items()}
    module = next(iter(bank.modules.values()))
    first = bank.add_expert("a", read_adapter(bert["a"]))
    A_ptr = module.A.data_ptr()
    bank.add_expert("b", read_adapter(bert["b"]))
    assert module.A.data_ptr() == A_ptr and bank.capacity == 2  # within capacity: no copy
    for i in range(3):
        bank.add_expert(f"c{i}", read_adapter(bert["c"]))
    assert bank.capacity == 8  # 2 -> 4 -> 8 (amortised doubling)
    assert module.A.shape == (8, MAX_RANK, 32) and module.B.shape == (8, 32, MAX_RANK)
    assert module.A.is_contiguous() and module.B_t.is_contiguous()
    assert {name: id(m) for name, m in model.named_modules()} == modules_before
    assert {n: m.base_layer.weight.data_ptr() for n, m in bank.modules.items()} == base_ptrs
    assert len(bank) == 5 and bank.expert_ids == ["a", "b", "c0", "c1", "c2"]
    inputs = batch()
    peft_bert.set_adapter("a")
    with route(bank, [[first]] * 4, [[1.0]] * 4):
        got = hidden(model, inputs)
    torch.testing.assert_close(got, hidden(peft_bert, inputs), rtol=1e-5, atol=1e-5)


def test_reserving_capacity_up_front_keeps_later_additions_in_place(bert):
    _, bank = bank_model(bert["base"], capacity=1)
    bank.reserve(6)
    assert bank.capacity == 6
    module = next(iter(bank.modules.values()))
    pointer = module.A.data_ptr()
    for i in range(6):
        bank.add_expert(f"e{i}", read_adapter(bert["a"]))
    assert module.A.data_ptr() == pointer and bank.capacity == 6


def test_removing_an_expert_zeroes_and_frees_its_slot_for_the_next_one(bert, peft_bert):
    model, bank = bank_model(bert["base"])
    for name in ("a", "b", "c"):
        bank.add_expert(name, read_adapter(bert[name]))
    freed = bank.slot_of("b")
    bank.remove_expert("b")
    assert "b" not in bank and len(bank) == 2
    with pytest.raises(KeyError):
        bank.slot_of("b")
    with pytest.raises(KeyError):
        bank.remove_expert("b")
    for module in bank.modules.values():
        assert not module.A[freed].any() and not module.B_t[freed].any()
    assert bank.add_expert("b2", read_adapter(bert["b"])) == freed
    assert bank.add_expert("d", read_adapter(bert["a"])) == 3
    inputs = batch()
    peft_bert.set_adapter("b")
    with route(bank, [[freed]] * 4, [[1.0]] * 4):
        got = hidden(model, inputs)
    torch.testing.assert_close(got, hidden(peft_bert, inputs), rtol=1e-5, atol=1e-5)
    peft_bert.set_adapter("a")


def test_adding_an_expert_again_replaces_it_in_its_slot(bert, peft_bert):
    model, bank = bank_model(bert["base"])
    slot = bank.add_expert("x", read_adapter(bert["c"]))
    bank.add_expert("y", read_adapter(bert["b"]))
    assert bank.add_expert("x", read_adapter(bert["a"])) == slot and len(bank) == 2
    inputs = batch()
    peft_bert.set_adapter("a")
    with route(bank, [[slot]] * 4, [[1.0]] * 4):
        got = hidden(model, inputs)
    torch.testing.assert_close(got, hidden(peft_bert, inputs), rtol=1e-5, atol=1e-5)


def test_lower_rank_experts_are_zero_padded_with_scaling_folded_into_b():
    layer = RoutedLoraLinear(torch.nn.Linear(6, 5), "m", max_rank=4, capacity=1)
    A, B = torch.randn(2, 6), torch.randn(5, 2)
    layer.set_slot(3, A, B, scaling=0.5)
    assert layer.capacity == 4
    torch.testing.assert_close(layer.A[3, :2], A)
    torch.testing.assert_close(layer.B[3, :, :2], 0.5 * B)
    assert not layer.A[3, 2:].any() and not layer.B[3, :, 2:].any()
    with pytest.raises(ValueError, match="max_rank"):
        layer.set_slot(0, torch.randn(5, 6), torch.randn(5, 5), 1.0)


def test_a_rejected_expert_leaves_the_bank_unchanged(bert):
    _, bank = bank_model(bert["base"])
    good = read_adapter(bert["a"])
    bank.add_expert("a", good)
    path = next(iter(good))
    wrong_shape = dict(good, **{path: (torch.randn(2, 31), good[path][1], 1.0)})
    with pytest.raises(ValueError, match="do not fit"):
        bank.add_expert("bad", wrong_shape)
    with pytest.raises(KeyError, match="matches no"):
        bank.add_expert("bad", {"encoder.layer.0.output.dense": good[path]})
    too_big = {path: (torch.randn(9, 32), torch.randn(32, 9), 1.0)}
    with pytest.raises(ValueError, match="max_rank"):
        bank.add_expert("bad", too_big)
    assert bank.expert_ids == ["a"]
    with pytest.raises(ValueError, match="slots must lie"):
        bank.route_examples(torch.tensor([[8]]), torch.tensor([[1.0]]))


def test_expert_module_paths_resolve_by_unique_suffix(bert, peft_bert):
    model, bank = bank_model(bert["base"])
    prefixed = {f"bert.{k}": v for k, v in read_adapter(bert["b"]).items()}
    slot = bank.add_expert("b", prefixed)
    inputs = batch()
    peft_bert.set_adapter("b")
    with route(bank, [[slot]] * 4, [[1.0]] * 4):
        got = hidden(model, inputs)
    torch.testing.assert_close(got, hidden(peft_bert, inputs), rtol=1e-5, atol=1e-5)
    peft_bert.set_adapter("a")


def test_nbytes_of_counts_the_padded_slot_in_every_module(bert):
    _, bank = bank_model(bert["base"])
    bank.add_expert("a", read_adapter(bert["a"]))
    # 4 modules x r_max 8 x (32 + 32) x 4 bytes, whatever the expert's rank (2)
    assert bank.nbytes_of("a") == 4 * MAX_RANK * 64 * 4
    with pytest.raises(KeyError):
        bank.nbytes_of("nope")


def test_bfloat16_bank_matches_float32_peft_within_tolerance(bert, peft_bert):
    model = AutoModel.from_pretrained(str(bert["base"]), dtype=torch.bfloat16).eval()
    bank = LoraBank.inject(model, TARGETS, max_rank=MAX_RANK)
    slots = [bank.add_expert(name, read_adapter(bert[name])) for name in ("a", "c")]
    assert next(iter(bank.modules.values())).A.dtype == torch.bfloat16
    inputs = batch()
    expected = hidden(peft_bert, inputs, adapter_names=["a", "c", "a", "c"])
    with route(bank, [[slots[0]], [slots[1]]] * 2, [[1.0]] * 4):
        got = hidden(model, inputs).float()
    # bf16 keeps 8 bits of mantissa; hidden states are layer-normed (unit scale)
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.1)
    assert (got - expected).abs().mean() < 0.02


def test_serving_adds_the_example_delta_in_place_exactly_as_computed_apart():
    """The decode path (decision cleaned once, delta added into the layer's output) equals
    ``out + example_mixed_delta`` for top-2 mixtures with an empty slot."""
    torch.manual_seed(0)
    experts, rank, d_in, d_out, rows, tokens = 5, 4, 24, 16, 6, 3
    A = torch.randn(experts, rank, d_in)
    B = torch.randn(experts, rank, d_out).transpose(1, 2)  # the bank's layout: a view
    x = torch.randn(rows, tokens, d_in)
    out = torch.randn(rows, tokens, d_out)
    slots = torch.tensor([[0, 1], [2, -1], [4, 4], [-1, -1], [3, 0], [1, 2]])
    weights = torch.rand(rows, 2)
    expected = out + example_mixed_delta(x, A, B, slots, weights)
    add_example_mixed_delta_(out, x, A, B, *clean_example_decision(slots, weights, x.dtype))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
