"""PHATGOOSE: token-level routing among experts by their independently trained gate vectors.

Muqeeth et al. (2024), "Learning to Route Among Specialized Experts for Zero-Shot
Generalization" (Post-Hoc Adaptive Tokenwise Gating Over an Ocean of Specialized Experts). After
training its LoRA, each contributor freezes it and trains one sigmoid gate vector ``g_e`` [d_in]
per adapted module (``gates.<module>`` in the uploaded statistics). At inference, for a token
``h`` [d_in] entering module ``m``, the paper standardises both the token activation and every
gate vector (zero mean, unit variance across the ``d_in`` dimension -- a LayerNorm without
affine parameters, as ``Router(score_type="original", router_norm_type="layer_norm")`` in the
reference code https://github.com/r-three/phatgoose, ``src/models/addons/moe.py``) and scales
the dot product by ``1 / sqrt(d_in)``::

    z(v)     = (v - mean(v)) / sqrt(var(v) + eps)      mean/var over the d_in entries (biased)
    s_e(h)   = <z(h), z(g_e)> / sqrt(d_in)
    weights  = softmax( topk_e(s(h)) / T )              over the k best experts (paper: k = 2)

The reference code takes ``softmax`` over all experts and then keeps the top-k; renormalising
those (its ``normalize_topk=True``) gives exactly the softmax over the top-k used here, so the
weights sum to 1. ``T = 1`` is the paper's setting.

The standardised, scaled gates ``z(g_e) / sqrt(d_in)`` are precomputed at fit time (stored as
``vectors/<module>``); routing a token costs one LayerNorm and one ``[N, d] x [d, E_m]`` product.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from moerge.router_training.base import ExpertRecord, Needs, RouterConfig
from moerge.router_training.methods import register_router
from moerge.router_training.token_router import ModuleVectorRouter


@dataclass
class PhatgooseRouterConfig(RouterConfig):
    """PHATGOOSE routing from uploaded gate vectors."""

    top_k: int = 2  # experts per token and module (the paper's top-2)
    temperature: float = 1.0  # softmax temperature over the top-k scores (paper: 1)
    eps: float = 1e-5  # variance epsilon of the standardisation (torch LayerNorm's default)

    def validate(self) -> None:
        """Refuse out-of-range settings with a ``ValueError`` naming the field (configs come from
        JSON and the CLI)."""
        super().validate()
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")


def standardise(vectors: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero mean, unit variance over the last dimension (LayerNorm without affine)."""
    return F.layer_norm(vectors.to(torch.float32), vectors.shape[-1:], eps=eps)


@register_router
class PhatgooseRouter(ModuleVectorRouter):
    """``vectors/<module>`` holds ``z(g_e) / sqrt(d_in)`` [E_m, d_in] per module."""

    needs: ClassVar[Needs] = "gates"

    method: ClassVar[str] = "phatgoose"
    config_class: ClassVar[type[RouterConfig]] = PhatgooseRouterConfig
    config: PhatgooseRouterConfig

    @classmethod
    def fit(cls, experts: Sequence[ExpertRecord], config: RouterConfig) -> PhatgooseRouter:
        """PHATGOOSE's per-module expert vectors are the gate vectors each contributor trained;
        experts without gates are refused."""
        router = cls(config, [e.expert_id for e in experts])
        missing = [e.expert_id for e in experts if e.statistics is None or not e.statistics.gates]
        if missing:
            raise ValueError(f"experts without PHATGOOSE gate vectors: {missing[:10]}")
        per_module: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
        for index, expert in enumerate(experts):
            assert expert.statistics is not None
            for module, gate in expert.statistics.gates.items():
                if gate.ndim != 1:
                    raise ValueError(
                        f"expert {expert.expert_id!r}: gate of {module!r} must be 1-D, "
                        f"got shape {tuple(gate.shape)}"
                    )
                scaled = standardise(gate, router.config.eps) / math.sqrt(gate.shape[0])
                per_module[module].append((index, scaled))
        router._set_vectors(per_module)
        return router

    def linear_scores(self, module: str, hidden: torch.Tensor) -> torch.Tensor:
        """Tokens' standardised hidden states projected onto the module's gate vectors."""
        vectors, _ = self._placed_for(module, hidden)
        return standardise(hidden, self.config.eps).to(vectors.dtype) @ vectors.T
