"""Small synthetic experts with planted structure, shared by the router tests."""

from __future__ import annotations

import math

import torch

from moerge.router_training import (
    ExpertRecord,
    ExpertStatistics,
    LoraModuleWeights,
    RoutingDecision,
)
from moerge.router_training.base import Router

NUM_EXPERTS = 5
HIDDEN = 16  # example-level embedding size
D_IN, D_OUT, RANK = 16, 12, 2  # LoRA module shapes
MODULES = ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value")

#: Cheap settings so that every method fits in well under a second.
FAST_PARAMS: dict[str, dict[str, object]] = {
    "mlp": {"hidden_sizes": [32], "steps": 30, "batch_size": 128, "calibration_samples": 256},
    "lda": {"calibration_samples": 256},
    "qda": {"calibration_samples": 256},
}


def orthonormal(n: int, dim: int, seed: int) -> torch.Tensor:
    """``n`` orthonormal rows of size ``dim``."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, n, generator=gen))
    return q.T.contiguous()


def planted_experts(num_experts: int = NUM_EXPERTS, seed: int = 0) -> list[ExpertRecord]:
    """Experts with every kind of input a router may need, each with a planted direction.

    Expert ``e`` owns the unit direction ``u_e`` (orthonormal across experts):
    * statistics: mean ``0.95 u_e`` with a small diag + rank-2 covariance, so that
      ``E ||x||^2 ~= 1`` as for the L2-normalised embeddings contributors summarise;
    * PHATGOOSE gates: ``u_e`` plus a little noise, per module;
    * LoRA: ``A_e = [4 u_e; noise]``, so the top right singular vector of ``B_e A_e`` is ~``u_e``.
    """
    gen = torch.Generator().manual_seed(seed)
    directions = orthonormal(num_experts, HIDDEN, seed)
    experts = []
    for e in range(num_experts):
        u = directions[e]
        stats = ExpertStatistics(
            example_count=100 * (e + 1),
            mean=0.95 * u,
            cov_diag=torch.full((HIDDEN,), 0.004) + 0.002 * torch.rand(HIDDEN, generator=gen),
            cov_factor=0.03 * torch.randn(HIDDEN, 2, generator=gen),
            gates={m: u + 0.05 * torch.randn(D_IN, generator=gen) for m in MODULES},
        )
        lora = {}
        for m in MODULES:
            a = 0.05 * torch.randn(RANK, D_IN, generator=gen)
            a[0] += 4.0 * u
            lora[m] = LoraModuleWeights(A=a, B=torch.randn(D_OUT, RANK, generator=gen), scaling=2.0)
        experts.append(
            ExpertRecord(
                expert_id=f"expert-{e}",
                task_name=f"task-{e}",
                statistics=stats,
                load_lora=lambda lora=lora: lora,
            )
        )
    return experts


def planted_directions(num_experts: int = NUM_EXPERTS, seed: int = 0) -> torch.Tensor:
    """The ``u_e`` of :func:`planted_experts` (rows)."""
    return orthonormal(num_experts, HIDDEN, seed)


def probe_inputs(
    num_experts: int = NUM_EXPERTS, per_expert: int = 6, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm inputs near each planted direction: ``x`` [E * per_expert, HIDDEN], experts."""
    gen = torch.Generator().manual_seed(seed)
    directions = planted_directions(num_experts)
    labels = torch.arange(num_experts).repeat_interleave(per_expert)
    x = 0.95 * directions[labels] + 0.05 * torch.randn(len(labels), HIDDEN, generator=gen)
    return torch.nn.functional.normalize(x, dim=-1), labels


def route_any(router: Router, rows: int, top_k: int | None = None) -> RoutingDecision:
    """Route ``rows`` inputs near the planted directions with whatever input the router takes."""
    x, _ = probe_inputs(NUM_EXPERTS, per_expert=math.ceil(rows / NUM_EXPERTS))
    x = x[:rows]
    if router.evaluation_only:
        ids = [router.expert_ids[i % router.num_experts] for i in range(rows)]
        return router.route_sources(ids, top_k)  # type: ignore[attr-defined]
    if router.granularity == "token":
        return router.route_tokens(router.modules[0], 5 * x, top_k)
    return router.route_examples(x, top_k)
