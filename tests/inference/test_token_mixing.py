"""Token-level mixing: every implementation in ``mixing`` computes the dense top-k mixture, and
the bank under per-token routing serves exactly what PEFT's Arrow serves.

Arrow's routing is recomputed here from the saved adapters exactly as PEFT's
``ArrowLoraLinearLayer`` does (power-iteration prototypes, ``|h . p|``, top-k, softmax) and
handed to the bank as a callback; the test also checks that these prototypes are PEFT's own.
PHATGOOSE-style routing (sigmoid gates) is checked against a dense reference model that
computes all E experts' deltas and weights them by an [N, E] matrix that is zero outside the
top-k.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import ArrowConfig, LoraConfig, create_arrow_model, get_peft_model
from peft.tuners.lora.arrow import ArrowLoraLinearLayer
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel

from moerge.coordinator.inference import mixing
from moerge.coordinator.inference.lora_bank import LoraBank
from tests.tiny_models import make_tiny_bert

TARGETS = ["query", "value"]
RANK = 4
MAX_EXPERTS = 16
ARROW_SEED = 7

Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


# ------------------------------------------------------------------------------------------
# the kernels against a dense reference
# ------------------------------------------------------------------------------------------
def dense_mixture(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """All E deltas, weighted by a dense [N, E] matrix (zero outside the chosen slots), in f64."""
    E = A.shape[0]
    dense = torch.zeros(x.shape[0], E, dtype=torch.float64)
    chosen = slots >= 0
    dense.scatter_add_(1, slots.clamp(min=0), torch.where(chosen, weights.double(), 0.0))
    deltas = torch.einsum("eor,erd,nd->neo", B.double(), A.double(), x.double())  # [N, E, d_out]
    return torch.einsum("ne,neo->no", dense, deltas)


def random_bank(E: int, r: int, d_in: int, d_out: int, dtype: torch.dtype, seed: int = 0):
    """A [E, r, d_in] and B [E, d_out, r], B laid out as the bank keeps it (a transposed view)."""
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(E, r, d_in, generator=generator).to(dtype)
    B_t = torch.randn(E, r, d_out, generator=generator).to(dtype)
    return A, B_t.transpose(1, 2)


def random_decision(N: int, k: int, E: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    slots = torch.randint(-1, E, (N, k), generator=generator)
    slots[0] = torch.tensor([2] * k)  # the same expert twice in one row adds up
    weights = torch.rand(N, k, generator=generator)
    return slots, weights


IMPLEMENTATIONS = {
    "dispatch": mixing.token_mixed_delta,
    "sparse": lambda x, A, B, s, w: mixing._token_delta_sparse(
        x, A, B, *mixing._clean_decision(s, w, x.shape[0], A.dtype)
    ),
    "segmented": lambda x, A, B, s, w: mixing._token_delta_segmented(
        x, A, B, *mixing._clean_decision(s, w, x.shape[0], A.dtype)
    ),
}


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize(
    ("E", "r", "d_in", "d_out", "k"),
    [(8, 4, 16, 24, 2), (64, 8, 32, 32, 4), (5, 3, 7, 9, 1)],  # odd sizes: per-segment loop
)
def test_token_mixing_equals_dense_top_k_mixture(impl, E, r, d_in, d_out, k):
    A, B = random_bank(E, r, d_in, d_out, torch.float32)
    x = torch.randn(53, d_in, generator=torch.Generator().manual_seed(2))
    slots, weights = random_decision(53, k, E)
    got = IMPLEMENTATIONS[impl](x, A, B, slots, weights)
    assert got.shape == (53, d_out) and got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(), dense_mixture(x, A, B, slots, weights), rtol=1e-5, atol=1e-4
    )


def test_token_mixing_ignores_empty_slots_whatever_their_weight():
    A, B = random_bank(6, 4, 8, 8, torch.float32)
    x = torch.randn(4, 8)
    slots = torch.tensor([[-1, -1], [1, -1], [-1, 3], [2, 5]])
    weights = torch.full((4, 2), 0.5)
    got = mixing.token_mixed_delta(x, A, B, slots, weights)
    assert not got[0].any()
    torch.testing.assert_close(got[1], 0.5 * B[1] @ A[1] @ x[1])
    torch.testing.assert_close(got[2], 0.5 * B[3] @ A[3] @ x[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_example_mixing_equals_dense_mixture_of_every_token(dtype):
    A, B = random_bank(9, 8, 16, 12, dtype)
    for n, T, k in [(5, 7, 2), (6, 3, 1), (6, 1, 1)]:
        x = torch.randn(n, T, 16).to(dtype)
        slots, weights = random_decision(n, k, 9, seed=n + T)
        got = mixing.example_mixed_delta(x, A, B, slots, weights)
        expected = dense_mixture(
            x.reshape(-1, 16), A, B, slots.repeat_interleave(T, 0), weights.repeat_interleave(T, 0)
        ).view(n, T, 12)
        assert got.dtype == dtype
        tol = {
            torch.float32: {"rtol": 1e-5, "atol": 1e-4},
            torch.bfloat16: {"rtol": 2e-2, "atol": 0.2},
            torch.float64: {},
        }[dtype]
        torch.testing.assert_close(got.double(), expected, **tol)


def test_top1_decode_steps_of_a_wide_model_grouped_by_slot_equal_the_dense_mixture():
    A, B = random_bank(6, 8, 1024, 16, torch.float32)  # d_in >= 1024, T <= r: grouped path
    x = torch.randn(7, 1, 1024)
    slots = torch.tensor([[3], [1], [3], [-1], [5], [1], [3]])
    weights = torch.rand(7, 1)
    got = mixing.example_mixed_delta(x, A, B, slots, weights)
    expected = dense_mixture(x.reshape(-1, 1024), A, B, slots, weights).view(7, 1, 16)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    assert not got[3].any()


def test_bfloat16_token_mixing_is_close_to_the_float64_mixture():
    A, B = random_bank(16, 8, 32, 32, torch.bfloat16)
    x = torch.randn(64, 32).to(torch.bfloat16)
    slots, weights = random_decision(64, 2, 16)
    got = mixing.token_mixed_delta(x, A, B, slots, weights)
    assert got.dtype == torch.bfloat16
    expected = dense_mixture(x, A, B, slots, weights)
    # bf16 rounds inputs, the rank-space products and the output: ~1% of the output's scale
    assert (got.double() - expected).abs().max() < 0.02 * expected.abs().max()


def test_segment_matmul_multiplies_each_segment_by_its_matrix():
    x = torch.randn(10, 8)
    W = torch.randn(4, 8, 4)
    offs = torch.tensor([3, 3, 7, 10], dtype=torch.int32)  # the second segment is empty
    got = mixing.segment_matmul(x, W, offs)
    expected = torch.cat([x[0:3] @ W[0], x[3:7] @ W[2], x[7:10] @ W[3]])
    torch.testing.assert_close(got, expected)


def test_segment_matmul_splits_more_segments_than_grouped_mm_takes(monkeypatch):
    monkeypatch.setattr(mixing, "GROUPED_MM_MAX_GROUPS", 3)
    x = torch.randn(20, 8)
    W = torch.randn(7, 8, 4)
    ends = [2, 2, 5, 9, 9, 15, 20]
    got = mixing.segment_matmul(x, W, torch.tensor(ends, dtype=torch.int32))
    starts = [0, *ends[:-1]]
    expected = torch.cat([x[a:b] @ W[g] for g, (a, b) in enumerate(zip(starts, ends, strict=True))])
    torch.testing.assert_close(got, expected)


def added_into_zeros(add_):
    """An in-place ``out += delta`` implementation as a delta function (``out`` starts at 0)."""

    def delta(x, A, B, slots, weights):
        return add_(x.new_zeros(x.shape[0], B.shape[1]), x, A, B, slots, weights)

    return delta


CUDA_IMPLEMENTATIONS = {
    "dispatch": mixing.token_mixed_delta,
    "segmented": IMPLEMENTATIONS["segmented"],
    "triton": mixing.sgmv_triton.sgmv_token_delta,  # takes slot -1 as it is
    "add_in_place": added_into_zeros(mixing.add_token_mixed_delta_),
    "triton_add_in_place": added_into_zeros(mixing.sgmv_triton.sgmv_token_add_),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mixing_in_place_adds_to_the_layer_output_rounding_once():
    """``out += delta`` in bf16 is the float64 sum up to one rounding of the result and the bf16
    intermediates (each pair's ``z`` and delta): no float32 buffer, no second rounding."""
    A, B = random_bank(64, 16, 256, 512, torch.bfloat16)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1000, 256, generator=generator).bfloat16()
    out = torch.randn(1000, 512, generator=generator).bfloat16()
    slots, weights = random_decision(1000, 2, 64)
    truth = out.double() + dense_mixture(x, A, B, slots, weights)
    used = (slots >= 0).double()
    z = torch.einsum("nd,nkrd->nkr", x.double(), A[slots.clamp(min=0)].double())  # [N, k, r]
    z = z.abs() * (weights.double() * used).unsqueeze(-1)
    intermediates = torch.einsum("nkr,nkor->no", z, B[slots.clamp(min=0)].double().abs())
    got = mixing.add_token_mixed_delta_(
        out.cuda(), x.cuda(), A.cuda(), B.cuda(), slots.cuda(), weights.cuda()
    )
    assert got.dtype == torch.bfloat16 and got.shape == out.shape
    bound = 2.0**-8 * truth.abs() + 2.0**-7 * intermediates + 1e-6
    assert bool(((got.cpu().double() - truth).abs() <= bound).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", sorted(CUDA_IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("E", "r", "d_in", "d_out", "k"),
    [(8, 16, 256, 128, 2), (1100, 8, 64, 48, 3), (5, 3, 7, 9, 1)],
)
def test_cuda_token_mixing_equals_dense_top_k_mixture(impl, dtype, E, r, d_in, d_out, k):
    if impl.startswith("triton") and (dtype == torch.float32 or not mixing.sgmv_triton.available()):
        pytest.skip("the Triton kernels serve half precision, with Triton installed")
    A, B = random_bank(E, r, d_in, d_out, dtype)
    x = torch.randn(300, d_in, generator=torch.Generator().manual_seed(2)).to(dtype)
    slots, weights = random_decision(300, k, E)
    expected = dense_mixture(x, A, B, slots, weights)
    A, B, x = A.cuda(), B.cuda(), x.cuda()
    got = CUDA_IMPLEMENTATIONS[impl](x, A, B, slots.cuda(), weights.cuda())
    assert got.shape == (300, d_out)
    error = (got.double().cpu() - expected).abs().max() / expected.abs().max()
    assert error < (2e-2 if dtype == torch.bfloat16 else 1e-5)


# ------------------------------------------------------------------------------------------
# the bank under token routing, against PEFT's Arrow
# ------------------------------------------------------------------------------------------
def save_adapter(base: Path, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModel.from_pretrained(str(base)),
        LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS),
    )
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            nn.init.normal_(module.lora_A["default"].weight, std=0.3)
            nn.init.normal_(module.lora_B["default"].weight, std=0.3)
    model.save_pretrained(str(out))
    return out


def token_ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(7, 60, (n, length), generator=torch.Generator().manual_seed(seed))


def read_adapter(folder: Path) -> Factors:
    config = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(str(folder / "adapter_model.safetensors"))
    return LoraBank.lora_weights_from_peft(state, config)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("arrow")
    base = make_tiny_bert(root / "base")
    return base, [save_adapter(base, root / f"e{i}", seed=100 + i) for i in range(MAX_EXPERTS)]


def arrow_prototype(A: torch.Tensor, B: torch.Tensor, seed: int, iters: int = 15) -> torch.Tensor:
    """PEFT's ``top_right_singular_vec_from_BA``: power iteration on A^T B^T B A, from a seeded
    Gaussian start (unscaled factors, as PEFT passes them)."""
    A32, B32 = A.float(), B.float()
    C = B32.T @ B32
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(A32.shape[1], generator=generator)
    v = v / (v.norm() + 1e-8)
    for _ in range(iters):
        w = A32.T @ (C @ (A32 @ v))
        v = w / (w.norm() + 1e-8)
    return v


class ArrowRouting:
    """Arrow's routing as PEFT computes it, mapped to bank slots; records its calls."""

    def __init__(self, experts: list[Factors], slots: list[int], top_k: int, temperature=1.0):
        self.top_k, self.temperature = top_k, temperature
        self.slots = torch.tensor(slots)
        scalings = [{m: s for m, (_, _, s) in e.items()} for e in experts]
        # PEFT builds prototypes from lora_A / lora_B as stored (scaling not applied)
        self.prototypes = {
            module: torch.stack(
                [arrow_prototype(e[module][0], e[module][1], ARROW_SEED) for e in experts]
            )
            for module in experts[0]
        }
        assert all(s == scalings[0] for s in scalings)
        self.calls: list[str] = []

    def __call__(self, module: str, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(module)
        sim = torch.abs(hidden @ self.prototypes[module].T)  # [N, E]
        top, idx = torch.topk(sim, self.top_k, dim=1)  # [N, k]
        return self.slots[idx], torch.softmax(top / self.temperature, dim=1)


@pytest.mark.parametrize("E", [4, 8, 16])
def test_bank_under_arrow_routing_equals_peft_arrow(library, E):
    base, folders = library
    experts = [read_adapter(f) for f in folders[:E]]
    model = AutoModel.from_pretrained(str(base)).eval()
    bank = LoraBank.inject(model, TARGETS, max_rank=8, initial_capacity=2)
    # slots in a scrambled order, to show the bank does not care which slot holds which expert
    for i in reversed(range(E)):
        bank.add_expert(f"e{i}", experts[i])
    slots = [bank.slot_of(f"e{i}") for i in range(E)]
    inputs = {"input_ids": token_ids(3, 11, seed=E)}
    config = ArrowConfig(top_k=1, router_temperature=1.0, rng_seed=ARROW_SEED)
    arrow = create_arrow_model(
        AutoModel.from_pretrained(str(base)), [str(f) for f in folders[:E]], config
    ).eval()
    arrow_layers = [m for m in arrow.modules() if isinstance(m, ArrowLoraLinearLayer)]
    assert len(arrow_layers) == len(bank.modules)
    for top_k in (1, 2, 4):
        for layer in arrow_layers:  # read at every forward: one model serves every top_k
            layer.top_k = top_k
        router = ArrowRouting(experts, slots, top_k)
        with torch.no_grad():
            expected = arrow(**inputs).last_hidden_state
            with bank.route_tokens(router):
                got = model(**inputs).last_hidden_state
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert sorted(set(router.calls)) == sorted(bank.modules)
        for name in bank.modules:  # the test's prototypes are PEFT's own
            peft_layer = arrow.base_model.model.get_submodule(name).lora_arrow["arrow_router"]
            torch.testing.assert_close(router.prototypes[name], peft_layer.prototypes)


# ------------------------------------------------------------------------------------------
# PHATGOOSE-style routing against a dense reference model
# ------------------------------------------------------------------------------------------
class SigmoidGateRouting:
    """PHATGOOSE-style: sigmoid gates per (module, expert) on normalised tokens, top-k,
    softmax over the kept scores. Returns bank slots."""

    def __init__(self, modules: list[str], d_in: int, slots: list[int], top_k: int):
        generator = torch.Generator().manual_seed(11)
        self.gates = {m: torch.randn(len(slots), d_in, generator=generator) for m in modules}
        self.slots, self.top_k = torch.tensor(slots), top_k

    def choose(self, module: str, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices into the expert list [N, k] and weights [N, k]."""
        h = F.normalize(hidden.float(), dim=-1)
        scores = torch.sigmoid(h @ F.normalize(self.gates[module]).T)  # [N, E]
        top, idx = torch.topk(scores, self.top_k, dim=1)
        return idx, torch.softmax(top / 0.1, dim=1)

    def __call__(self, module: str, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx, weights = self.choose(module, hidden)
        return self.slots[idx], weights


class DenseMixLinear(nn.Module):
    """Reference layer: W x + b + sum_e D[n, e] s_e B_e A_e x with a dense D [N, E]."""

    def __init__(self, base: nn.Linear, name: str, experts: list[Factors], routing):
        super().__init__()
        self.base, self.name, self.routing = base, name, routing
        self.experts = [e[name] for e in experts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x.reshape(-1, x.shape[-1])
        idx, weights = self.routing.choose(self.name, hidden)
        dense = torch.zeros(hidden.shape[0], len(self.experts)).scatter(1, idx, weights)
        deltas = torch.stack([s * hidden @ A.T @ B.T for A, B, s in self.experts], dim=1)
        delta = (dense.unsqueeze(-1) * deltas).sum(dim=1)  # [N, d_out]
        return self.base(x) + delta.view(*x.shape[:-1], -1)


@pytest.mark.parametrize("top_k", [1, 3])
def test_bank_under_sigmoid_gate_routing_equals_dense_reference(library, top_k):
    base, folders = library
    E = 8
    experts = [read_adapter(f) for f in folders[:E]]
    model = AutoModel.from_pretrained(str(base)).eval()
    bank = LoraBank.inject(model, TARGETS, max_rank=4)
    for i in range(E):
        bank.add_expert(f"e{i}", experts[i])
    bank.remove_expert("e2")  # a hole in the slots, refilled by the same expert elsewhere
    bank.add_expert("e9", {m: (torch.zeros(4, 32), torch.zeros(32, 4), 1.0) for m in experts[0]})
    bank.add_expert("e2", experts[2])
    slots = [bank.slot_of(f"e{i}") for i in range(E)]
    assert slots[2] == E  # not its old slot
    routing = SigmoidGateRouting(sorted(bank.modules), 32, slots, top_k)
    reference = AutoModel.from_pretrained(str(base)).eval()
    for name in bank.modules:
        parent, _, child = name.rpartition(".")
        layer = reference.get_submodule(name)
        setattr(
            reference.get_submodule(parent), child, DenseMixLinear(layer, name, experts, routing)
        )
    inputs = {"input_ids": token_ids(4, 10, seed=3)}
    with torch.no_grad():
        expected = reference(**inputs).last_hidden_state
        with bank.route_tokens(routing):
            got = model(**inputs).last_hidden_state
        plain = model(**inputs).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the experts do change the output


def test_bfloat16_bank_under_token_routing_is_close_to_the_float32_reference(library):
    base, folders = library
    experts = [read_adapter(f) for f in folders[:6]]
    models = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModel.from_pretrained(str(base), dtype=dtype).eval()
        bank = LoraBank.inject(model, TARGETS, max_rank=4)
        slots = [bank.add_expert(f"e{i}", e) for i, e in enumerate(experts)]
        models[dtype] = (model, bank)
    table = torch.tensor(slots)

    def routing(module: str, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a decision that cannot flip with rounding: by token position and module
        n = torch.arange(hidden.shape[0]).unsqueeze(1)
        idx = (n * 5 + torch.tensor([[0, 1]]) * 3 + len(module)) % len(slots)  # [N, 2]
        return table[idx], torch.tensor([[0.7, 0.3]]).expand(hidden.shape[0], 2)

    inputs = {"input_ids": token_ids(4, 10, seed=5)}
    with torch.no_grad():
        outs = {}
        for dtype, (model, bank) in models.items():
            with bank.route_tokens(routing):
                outs[dtype] = model(**inputs).last_hidden_state.float()
    diff = (outs[torch.bfloat16] - outs[torch.float32]).abs()
    assert diff.max() < 0.15 and diff.mean() < 0.02  # layer-normed hidden states
