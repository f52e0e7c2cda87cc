"""Arrow: prototypes and per-token weights equal PEFT's; the exact solver equals a dense SVD."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moerge.router_training import (
    ArrowRouter,
    ArrowRouterConfig,
    ExpertRecord,
    LoraModuleWeights,
    fit_router,
    peft_lora_loader,
    read_peft_lora,
)
from moerge.router_training.arrow import (
    peft_start_vector,
    power_iteration_prototypes,
    svd_prototypes,
)
from tests.router_training.helpers import orthonormal
from tests.tiny_models import make_tiny_bert

NUM_ADAPTERS = 4
SEED = 7
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def peft_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tiny BERT and NUM_ADAPTERS saved PEFT LoRA adapters with random nonzero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("arrow")
    bert = make_tiny_bert(root / "bert", hidden_size=32, num_layers=2)
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(NUM_ADAPTERS):
        model = get_peft_model(
            AutoModel.from_pretrained(bert),
            LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]),
        )
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
        model.save_pretrained(root / f"adapter-{i}")
        paths.append(root / f"adapter-{i}")
    return bert, paths


def records(paths: list[Path]) -> list[ExpertRecord]:
    return [ExpertRecord(expert_id=p.name, load_lora=peft_lora_loader(p)) for p in paths]


def peft_arrow_run(
    bert: Path, paths: list[Path], top_k: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """Run PEFT's Arrow model; per LoRA module: (input x, Arrow delta, prototypes, B_e A_e s_e)."""
    from peft import ArrowConfig, create_arrow_model
    from transformers import AutoModel

    model = create_arrow_model(
        AutoModel.from_pretrained(bert),
        [str(p) for p in paths],
        ArrowConfig(top_k=top_k, router_temperature=TEMPERATURE, rng_seed=SEED),
    ).eval()
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_arrow"):

            def hook(mod, args, output, name=name) -> None:
                captured[name] = (args[0].detach(), output.detach())

            hooks.append(module.register_forward_hook(hook))
    input_ids = torch.randint(7, 60, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(input_ids=input_ids)
    out = {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_arrow"):
            continue
        x, y = captured[name]
        x = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            delta = y.reshape(-1, y.shape[-1]) - module.base_layer(x)
        arrow = module.lora_arrow["arrow_router"]
        experts = {
            n: module.scaling[n] * module.lora_B[n].weight @ module.lora_A[n].weight
            for n in arrow.task_adapter_names
        }
        path = name.removeprefix("base_model.model.")
        out[path] = (x, delta, arrow.prototypes.detach().clone(), experts)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_prototypes_and_token_weights_equal_peft_arrow(peft_setup, top_k: int) -> None:
    bert, paths = peft_setup
    router = fit_router(
        "arrow", records(paths), {"top_k": top_k, "temperature": TEMPERATURE, "rng_seed": SEED}
    ).router
    peft_modules = peft_arrow_run(bert, paths, top_k)
    assert sorted(peft_modules) == router.modules
    for module, (x, delta, peft_prototypes, experts) in peft_modules.items():
        torch.testing.assert_close(router.vectors[module], peft_prototypes, rtol=1e-5, atol=1e-6)
        # PEFT's per-token coefficients, recovered from its output:
        # delta_t = sum_e c_te * s_e B_e A_e x_t, a least-squares problem with E unknowns.
        names = [f"task_{i}" for i in range(NUM_ADAPTERS)]
        columns = torch.stack([x @ experts[n].T for n in names], dim=-1)  # [T, d_out, E]
        peft_coeff = torch.linalg.lstsq(columns, delta.unsqueeze(-1)).solution.squeeze(-1)
        ours = router.route_tokens(module, x)
        assert ours.k == top_k
        torch.testing.assert_close(ours.to_dense(NUM_ADAPTERS), peft_coeff, atol=1e-5, rtol=0)


def test_read_peft_lora_gives_base_model_paths_and_peft_scaling(peft_setup) -> None:
    _, paths = peft_setup
    lora = read_peft_lora(paths[0])
    assert sorted(lora) == [
        f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")
    ]
    weights = lora["encoder.layer.0.attention.self.query"]
    assert weights.A.shape == (4, 32) and weights.B.shape == (32, 4)
    assert weights.scaling == 2.0  # lora_alpha / r


def test_svd_solver_equals_dense_top_right_singular_vector() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 8, 40, generator=gen)
    b = torch.randn(6, 24, 8, generator=gen)
    protos = svd_prototypes(a, b)
    for m in range(6):
        dense_top = torch.linalg.svd((b[m] @ a[m]).double()).Vh[0].float()
        assert float((protos[m] @ dense_top).abs()) == pytest.approx(1.0, abs=1e-6)
        assert float(protos[m][protos[m].abs().argmax()]) > 0  # canonical sign


def test_power_iteration_converges_to_the_exact_prototype_given_a_spectral_gap() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(5, 4, 30, generator=gen)
    a[:, 0] *= 5.0  # one dominant direction per adapter
    b = torch.randn(5, 20, 4, generator=gen)
    start = peft_start_vector(30, SEED)
    approx = power_iteration_prototypes(a, b, start, iterations=15)
    cos = (approx * svd_prototypes(a, b)).sum(-1).abs()
    torch.testing.assert_close(cos, torch.ones(5), atol=1e-5, rtol=0)


def test_zero_delta_w_gives_a_zero_prototype_with_both_solvers() -> None:
    a = torch.randn(1, 4, 10)
    b = torch.zeros(1, 6, 4)  # LoRA's own initialisation: B = 0
    assert torch.equal(svd_prototypes(a, b), torch.zeros(1, 10))
    assert torch.equal(
        power_iteration_prototypes(a, b, peft_start_vector(10, 0), 15), torch.zeros(1, 10)
    )


@pytest.mark.parametrize("solver", ["power_iteration", "svd"])
def test_tokens_along_a_planted_input_direction_route_to_that_adapter(solver: str) -> None:
    directions = orthonormal(4, 24, seed=2)
    gen = torch.Generator().manual_seed(2)
    experts = []
    for e in range(4):
        a = 0.05 * torch.randn(3, 24, generator=gen)
        a[1] += 3.0 * directions[e]
        lora = {"layer.q": LoraModuleWeights(A=a, B=torch.randn(16, 3, generator=gen), scaling=1.0)}
        experts.append(ExpertRecord(expert_id=f"e{e}", load_lora=lambda lora=lora: lora))
    router = ArrowRouter.fit(experts, ArrowRouterConfig(top_k=2, prototype_solver=solver))
    tokens = 2.0 * directions + 0.1 * torch.randn(4, 24, generator=gen)
    decision = router.route_tokens("layer.q", tokens)
    assert decision.indices[:, 0].tolist() == [0, 1, 2, 3]
    assert bool((decision.weights[:, 0] > decision.weights[:, 1]).all())


def test_experts_adapting_different_modules_are_routed_only_where_they_exist() -> None:
    gen = torch.Generator().manual_seed(4)

    def lora(modules: list[str]) -> dict[str, LoraModuleWeights]:
        return {
            m: LoraModuleWeights(
                torch.randn(2, 8, generator=gen), torch.randn(8, 2, generator=gen), 1.0
            )
            for m in modules
        }

    adapters = [lora(["q", "v"]), lora(["q"]), lora(["q", "v"])]
    experts = [ExpertRecord(f"e{i}", load_lora=lambda a=a: a) for i, a in enumerate(adapters)]
    router = ArrowRouter.fit(experts, ArrowRouterConfig(top_k=1))
    assert router.members["v"].tolist() == [0, 2]
    decision = router.route_tokens("v", torch.randn(20, 8, generator=gen), top_k=2)
    assert set(decision.indices.flatten().tolist()) == {0, 2}
    with pytest.raises(ValueError, match="top_k"):
        router.route_tokens("v", torch.randn(2, 8), top_k=3)


def test_half_precision_hidden_states_are_scored_in_their_own_dtype_like_peft(peft_setup) -> None:
    """PEFT scores ``|x . p|`` in the adapters' dtype; a bf16 model's tokens are scored so here."""
    _bert, paths = peft_setup
    router = fit_router("arrow", records(paths), {"top_k": 2, "rng_seed": SEED}).router
    module = router.modules[0]
    hidden = torch.randn(
        64, router.vectors[module].shape[1], generator=torch.Generator().manual_seed(0)
    )
    half = hidden.bfloat16()
    expected = (half @ router.vectors[module].bfloat16().T).abs()
    torch.testing.assert_close(router.scores(module, half), expected, rtol=0, atol=0)
    assert router.scores(module, hidden).dtype == torch.float32
    assert router.route_tokens(module, half).weights.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_routing_cuda_hidden_states_keeps_decisions_on_the_gpu_and_equal_to_cpu(peft_setup) -> None:
    _bert, paths = peft_setup
    router = fit_router("arrow", records(paths), {"top_k": 2, "rng_seed": SEED}).router
    module = router.modules[0]
    hidden = torch.randn(
        256, router.vectors[module].shape[1], generator=torch.Generator().manual_seed(1)
    )
    cpu = router.route_tokens(module, hidden)
    gpu = router.route_tokens(module, hidden.cuda())
    assert gpu.indices.is_cuda and gpu.weights.is_cuda
    torch.testing.assert_close(gpu.indices.cpu(), cpu.indices)
    torch.testing.assert_close(gpu.weights.cpu(), cpu.weights, rtol=1e-4, atol=1e-5)
