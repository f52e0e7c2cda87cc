"""Seeded synthetic experts for benchmarks and tests (no data, no model, no download).

* :func:`synthetic_gaussian_experts`: statistics shaped like those of L2-normalised mean-pooled
  embeddings (``E ||x||^2 ~= 1``): expert means spread around a shared direction, covariance
  ``U U^T + diag(D)`` with a random rank-``k`` factor, optional PHATGOOSE gate vectors.
* :func:`synthetic_lora_experts`: LoRA adapters with random ``A`` [r, d_in] and ``B`` [d_out, r]
  for a set of modules, generated lazily per expert (``ExpertRecord.load_lora``) so that fitting
  over thousands of experts never holds them all in memory.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from moerge.router_training.base import ExpertRecord, ExpertStatistics, LoraModuleWeights

#: MiniLM-L6 (all-MiniLM-L6-v2) shapes: hidden 384, 6 layers.
MINILM_HIDDEN = 384
MINILM_LAYERS = 6


def minilm_modules(
    layers: int = MINILM_LAYERS, names: Sequence[str] = ("query", "value")
) -> dict[str, tuple[int, int]]:
    """``{module path: (d_in, d_out)}`` of MiniLM's attention projections."""
    return {
        f"encoder.layer.{i}.attention.self.{name}": (MINILM_HIDDEN, MINILM_HIDDEN)
        for i in range(layers)
        for name in names
    }


def synthetic_gaussian_experts(
    num_experts: int,
    hidden_size: int = MINILM_HIDDEN,
    rank: int = 16,
    *,
    seed: int = 0,
    mean_spread: float = 0.1,
    within_variance: float = 0.2,
    shared_covariance: float = 0.9,
    gate_modules: Mapping[str, int] | None = None,
    min_count: int = 50,
    max_count: int = 5000,
) -> list[ExpertRecord]:
    """``num_experts`` experts with statistics only (no adapter).

    Means are ``sqrt(1 - within_variance) * normalise(g + mean_spread * n_e)`` for a shared unit
    direction ``g``; the total within-expert variance ``tr(Sigma_e)`` is ``within_variance``,
    split evenly between the low-rank factor and the diagonal; the factor is
    ``sqrt(s) U_shared + sqrt(1 - s) U_e`` with ``s = shared_covariance``, since real experts'
    embeddings share much of their covariance structure (likewise ``D_e`` is a shared profile
    with +-5% per-expert jitter). ``gate_modules`` maps module
    paths to ``d_in`` for random gate vectors. Counts are log-uniform in
    ``[min_count, max_count]``.
    """
    gen = torch.Generator().manual_seed(seed)
    shared = F.normalize(torch.randn(hidden_size, generator=gen), dim=0)
    noise = torch.randn(num_experts, hidden_size, generator=gen) / math.sqrt(hidden_size)
    means = F.normalize(shared + mean_spread * noise, dim=-1) * math.sqrt(1 - within_variance)
    shared_factor = torch.randn(hidden_size, rank, generator=gen)
    own_factors = torch.randn(num_experts, hidden_size, rank, generator=gen)
    factors = (
        math.sqrt(shared_covariance) * shared_factor
        + math.sqrt(1 - shared_covariance) * own_factors
    )
    if rank:
        factors *= math.sqrt(within_variance / 2 / (hidden_size * rank))
    diag_share = within_variance / 2 if rank else within_variance
    shared_diag = torch.rand(hidden_size, generator=gen) + 0.5
    diags = shared_diag * (1 + 0.1 * (torch.rand(num_experts, hidden_size, generator=gen) - 0.5))
    diags *= diag_share / diags.sum(-1, keepdim=True)
    log_counts = torch.rand(num_experts, generator=gen) * math.log(max_count / min_count)
    counts = (min_count * log_counts.exp()).round().long()
    experts = []
    for e in range(num_experts):
        gates = {m: torch.randn(d_in, generator=gen) for m, d_in in (gate_modules or {}).items()}
        stats = ExpertStatistics(
            example_count=int(counts[e]),
            mean=means[e],
            cov_diag=diags[e],
            cov_factor=factors[e],
            gates=gates,
        )
        experts.append(
            ExpertRecord(expert_id=f"expert-{e:05d}", task_name=f"task-{e}", statistics=stats)
        )
    return experts


def _lora_loader(
    modules: Mapping[str, tuple[int, int]], rank: int, seed: int, alpha: float
) -> dict[str, LoraModuleWeights]:
    gen = torch.Generator().manual_seed(seed)
    return {
        module: LoraModuleWeights(
            A=torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in),
            B=torch.randn(d_out, rank, generator=gen) / math.sqrt(rank),
            scaling=alpha / rank,
        )
        for module, (d_in, d_out) in modules.items()
    }


def synthetic_lora_experts(
    num_experts: int,
    modules: Mapping[str, tuple[int, int]] | None = None,
    rank: int = 8,
    *,
    seed: int = 0,
    alpha: float = 16.0,
) -> list[ExpertRecord]:
    """``num_experts`` experts with lazily generated random LoRA adapters (no statistics).

    ``modules`` maps module paths to ``(d_in, d_out)``; default: MiniLM query/value, 6 layers.
    """
    modules = dict(modules or minilm_modules())
    return [
        ExpertRecord(
            expert_id=f"expert-{e:05d}",
            task_name=f"task-{e}",
            load_lora=functools.partial(_lora_loader, modules, rank, seed * 1_000_003 + e, alpha),
        )
        for e in range(num_experts)
    ]
