"""Arrow: zero-shot token-level routing among LoRA experts by their top singular directions.

Ostapenko et al. (2024), "Towards Modular LLMs by Building and Reusing a Library of LoRAs"
(https://huggingface.co/papers/2405.11157). For every adapted linear layer (module) and expert
``e`` with LoRA factors ``A_e`` [r, d_in] and ``B_e`` [d_out, r] (``delta W_e = B_e A_e``; the
LoRA ``scaling`` is a positive factor and does not change the direction), the expert's prototype
is the top *right* singular vector of ``delta W_e``::

    p_e = argmax_{||v|| = 1} || B_e A_e v ||                     [d_in]

and a token ``h`` [d_in] entering the module is routed by (sign-agnostic, since singular vectors
are only defined up to sign; ``h`` is not normalised)::

    s_e(h)   = | <h, p_e> |
    weights  = softmax( topk_e(s(h)) / T )   over the k highest-scoring experts

This matches PEFT's ``ArrowLoraLinearLayer`` (``peft/tuners/lora/arrow.py``) exactly: PEFT takes
the top-k of ``|tok @ prototypes.T|``, fills the rest with ``-inf``, and applies
``softmax(. / router_temperature)`` over all experts, which is the softmax over the top-k.

Prototypes are computed from the small factors only, never from ``delta W`` (d_out x d_in):

* ``prototype_solver="power_iteration"`` (default, PEFT's algorithm, bit-for-bit the same start):
  ``v_0 = g / ||g||`` with ``g ~ N(0, I)`` from a CPU ``torch.Generator`` seeded with
  ``rng_seed``, then ``power_iterations`` steps of::

      v <- A^T (B^T B) (A v),   v <- v / (||v|| + 1e-8)

  (``A^T B^T B A = delta W^T delta W``). Prototypes equal PEFT's under its
  ``ArrowConfig(rng_seed=...)`` with the same seed; like PEFT's, they are approximate when the
  top two singular values are close (error ~ ``(s_2 / s_1)^(2 * iterations)``), and exactly
  zero for a zero ``delta W``.
* ``prototype_solver="svd"`` (exact): thin QR ``A^T = Q R`` (Q [d_in, r], R [r, r]), so
  ``delta W = (B R^T) Q^T`` and ``delta W^T delta W = Q (R B^T B R^T) Q^T``; the top eigenvector
  ``u`` of the ``r x r`` matrix ``R B^T B R^T`` gives ``p = Q u``. Signs are made canonical
  (largest-magnitude entry positive); a zero ``delta W`` gives a zero prototype.

Both cost ``O(r^2 (d_in + d_out))`` per module and expert; experts are loaded one at a time
(``ExpertRecord.load_lora``) and the modules of many experts with equal factor shapes are
solved as one batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from moerge.router_training.base import ExpertRecord, LoraModuleWeights, Needs, RouterConfig
from moerge.router_training.methods import register_router
from moerge.router_training.token_router import ModuleVectorRouter

SOLVERS = ("power_iteration", "svd")
#: PEFT's ``eps`` in ``top_right_singular_vec_from_BA``.
PEFT_EPS = 1e-8
#: (expert, module) pairs solved together: amortises per-operation overhead over many experts.
_BATCH_MODULES = 2048


@dataclass
class ArrowRouterConfig(RouterConfig):
    """Arrow routing (defaults as PEFT's ``ArrowConfig``, except a fixed ``rng_seed``)."""

    top_k: int = 3  # experts per token and module (PEFT's default)
    temperature: float = 1.0  # softmax temperature (PEFT's ``router_temperature``)
    prototype_solver: str = "power_iteration"  # "power_iteration" (PEFT's) or "svd" (exact)
    power_iterations: int = 15  # power-iteration steps (PEFT's ``iters``)
    rng_seed: int = 0  # seed of the power iteration's start vector (PEFT's ``rng_seed``)

    def validate(self) -> None:
        """Refuse out-of-range settings with a ``ValueError`` naming the field (configs come from
        JSON and the CLI)."""
        super().validate()
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.prototype_solver not in SOLVERS:
            raise ValueError(
                f"prototype_solver must be one of {SOLVERS}, got {self.prototype_solver!r}"
            )
        iters = self.power_iterations
        if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
            raise ValueError(f"power_iterations must be an integer >= 1, got {iters!r}")
        if not isinstance(self.rng_seed, int) or isinstance(self.rng_seed, bool):
            raise ValueError(f"rng_seed must be an integer, got {self.rng_seed!r}")


def peft_start_vector(
    in_features: int, seed: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """PEFT's power-iteration start ``v_0`` [in_features] for its ``ArrowConfig(rng_seed=seed)``.

    PEFT draws it with a generator on the adapters' device, and a CUDA generator draws other
    numbers than a CPU one; as 15 iterations do not always converge (random adapters with a
    small spectral gap), PEFT's prototypes depend on where it ran. Fitting on the same device
    as PEFT reproduces them; the coordinator fits on CPU.
    """
    generator = torch.Generator(device=device).manual_seed(int(seed))
    v = torch.randn(in_features, dtype=torch.float32, generator=generator, device=device)
    return v / (v.norm() + PEFT_EPS)


def power_iteration_prototypes(
    lora_a: torch.Tensor, lora_b: torch.Tensor, start: torch.Tensor, iterations: int
) -> torch.Tensor:
    """PEFT's power iteration, batched: ``A`` [M, r, d_in], ``B`` [M, d_out, r] -> [M, d_in].

    Same iterates as PEFT's ``v <- A^T (B^T B) (A v) / (||.|| + eps)``, carried in ``r``
    coordinates: after the first step every iterate lies in the row space of ``A``, ``v = A^T y``,
    so with ``G = A A^T`` and ``C = B^T B`` (both ``r x r``) a step is ``y <- C G y`` and
    ``||A^T y|| = sqrt(y^T G y)``. Only the first and last steps touch ``d_in``-sized vectors.
    """
    a = lora_a.to(torch.float32)
    b = lora_b.to(torch.float32)
    gram_b = b.transpose(1, 2) @ b  # C = B^T B   [M, r, r]
    gram_a = a @ a.transpose(1, 2)  # G = A A^T   [M, r, r]

    def normalise(y: torch.Tensor) -> torch.Tensor:  # y [M, r, 1] -> y / (||A^T y|| + eps)
        norm_sq = (y.transpose(1, 2) @ gram_a @ y).clamp_min(0)
        return y / (norm_sq.sqrt() + PEFT_EPS)

    v0 = start.to(torch.float32).reshape(1, -1, 1)
    y = normalise(gram_b @ (a @ v0))  # first step: A^T C A v0 = A^T y
    for _ in range(iterations - 1):
        y = normalise(gram_b @ (gram_a @ y))
    return (a.transpose(1, 2) @ y).squeeze(-1)


def svd_prototypes(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """Exact top right singular vectors of ``B A``: ``A`` [M, r, d_in], ``B`` [M, d_out, r]."""
    a = lora_a.to(torch.float64)
    b = lora_b.to(torch.float64)
    q, r = torch.linalg.qr(a.transpose(1, 2))  # A^T = Q R: Q [M, d_in, r'], R [M, r', r]
    k = b @ r.transpose(1, 2)  # delta W = K Q^T   [M, d_out, r']
    evals, evecs = torch.linalg.eigh(k.transpose(1, 2) @ k)  # ascending
    v = (q @ evecs[..., -1:]).squeeze(-1)  # [M, d_in]
    v = v * (evals[..., -1:] > 0)
    pivot = v.abs().argmax(dim=-1, keepdim=True)
    sign = torch.where(v.gather(-1, pivot) < 0, -1.0, 1.0).to(v.dtype)
    return (v * sign).to(torch.float32)


def _check_factors(expert_id: str, module: str, weights: LoraModuleWeights) -> None:
    a, b = weights.A, weights.B
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(
            f"expert {expert_id!r}, module {module!r}: need A [r, d_in] and B [d_out, r], got "
            f"A {tuple(a.shape)} and B {tuple(b.shape)}"
        )


@register_router
class ArrowRouter(ModuleVectorRouter):
    """Arrow prototypes per module; ``vectors/<module>`` holds the prototypes [E_m, d_in]."""

    needs: ClassVar[Needs] = "adapter"

    method: ClassVar[str] = "arrow"
    config_class: ClassVar[type[RouterConfig]] = ArrowRouterConfig
    config: ArrowRouterConfig

    incremental: ClassVar[bool] = True  # a prototype depends on its own expert only

    @classmethod
    def fit(cls, experts: Sequence[ExpertRecord], config: RouterConfig) -> ArrowRouter:
        """Arrow's prototypes from the experts' LoRA weights alone: per module, the top right
        singular vector of each expert's update ``B A``."""
        router = cls(config, [e.expert_id for e in experts])
        router._set_vectors(router._prototypes(experts, first_index=0))
        return router

    def extended(self, experts: Sequence[ExpertRecord]) -> ArrowRouter:
        """This router plus ``experts``' prototypes (see :meth:`Router.extended`).

        Each prototype depends on its own expert's factors and the fixed start vector only, so
        the result equals :meth:`fit` over the old experts then the new ones; the old tables are
        appended to, not recomputed nor copied (:meth:`ModuleVectorRouter._extended_by`):
        ``O(new experts)`` solves and rows, here and on the device that routes.
        """
        ids = [*self.expert_ids, *(e.expert_id for e in experts)]
        return self._extended_by(ids, self._prototypes(experts, first_index=self.num_experts))

    def _prototypes(
        self, experts: Sequence[ExpertRecord], first_index: int
    ) -> dict[str, list[tuple[int, torch.Tensor]]]:
        """``{module: [(expert index, prototype [d_in]), ...]}``, experts loaded one at a time."""
        missing = [e.expert_id for e in experts if e.load_lora is None]
        if missing:
            raise ValueError(f"experts without a LoRA adapter to load: {missing[:10]}")
        per_module: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
        pending: list[tuple[int, str, LoraModuleWeights]] = []
        for index, expert in enumerate(experts, start=first_index):
            assert expert.load_lora is not None
            lora = expert.load_lora()
            if not lora:
                raise ValueError(f"expert {expert.expert_id!r}: adapter has no LoRA modules")
            for module, weights in lora.items():
                _check_factors(expert.expert_id, module, weights)
                pending.append((index, module, weights))
            if len(pending) >= _BATCH_MODULES:
                self._solve(pending, per_module)
                pending = []
        self._solve(pending, per_module)
        return per_module

    def _solve(
        self,
        pending: list[tuple[int, str, LoraModuleWeights]],
        per_module: dict[str, list[tuple[int, torch.Tensor]]],
    ) -> None:
        """Prototypes of ``(expert index, module, factors)`` items, batched by factor shapes."""
        groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = defaultdict(list)
        for i, (_, _, w) in enumerate(pending):
            groups[(tuple(w.A.shape), tuple(w.B.shape))].append(i)
        for (a_shape, _), items in groups.items():
            a = torch.stack([pending[i][2].A.detach() for i in items])
            b = torch.stack([pending[i][2].B.detach() for i in items])
            if self.config.prototype_solver == "svd":
                protos = svd_prototypes(a, b)
            else:
                start = peft_start_vector(a_shape[1], self.config.rng_seed, device=a.device)
                protos = power_iteration_prototypes(a, b, start, self.config.power_iterations)
            for i, proto in zip(items, protos, strict=True):
                per_module[pending[i][1]].append((pending[i][0], proto))

    absolute_scores: ClassVar[bool] = True  # a prototype's sign is arbitrary: score |<v, h>|

    def linear_scores(self, module: str, hidden: torch.Tensor) -> torch.Tensor:
        """Tokens' projections onto the module's expert prototypes (their absolute values are
        scored: see ``absolute_scores``)."""
        prototypes, _ = self._placed_for(module, hidden)
        return hidden.to(prototypes.dtype) @ prototypes.T
